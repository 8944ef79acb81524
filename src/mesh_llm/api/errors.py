"""Errors in the OpenAI shape ({"error": {message, type, param, code}}) with the right HTTP status."""

from __future__ import annotations

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mesh_llm.router.client import RouterUnavailable

# HTTP status and OpenAI error type for each gRPC status the router answers with
_BY_GRPC = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (503, "service_unavailable_error"),  # the mesh is halted
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (503, "service_unavailable_error"),
}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 499: "invalid_request_error"}


class ApiError(Exception):
    """An error to answer with: HTTP status plus the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        """Status and message; type defaults from the status."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "server_error" if status < 503 else "service_unavailable_error")
        self.param = param
        self.code = code

    def body(self) -> dict:
        """The JSON body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """This error as a JSON response (with WWW-Authenticate on 401)."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def grpc_code(exc: RouterUnavailable) -> grpc.StatusCode | None:
    """The gRPC status behind a RouterUnavailable (client.py raises it from the AioRpcError)."""
    cause = exc.__cause__ or exc.__context__
    return cause.code() if isinstance(cause, grpc.aio.AioRpcError) else None


def from_router(exc: RouterUnavailable, *, halted: bool, halt_reason: str = "") -> ApiError:
    """Map a refused or broken Generate call to an ApiError; a halted mesh gets a message that says so."""
    code = grpc_code(exc)
    cause = exc.__cause__ or exc.__context__
    details = cause.details() if isinstance(cause, grpc.aio.AioRpcError) else str(exc)
    if code == grpc.StatusCode.FAILED_PRECONDITION or halted:
        reason = f" ({halt_reason})" if halt_reason else ""
        return ApiError(503, f"the mesh is halted{reason}: governance's kill switch stops all generation until "
                        f"a quorum of `mesh resume` votes lifts it. Router said: {details}",
                        type="service_unavailable_error", code="mesh_halted")
    status, kind = _BY_GRPC.get(code, (502, "server_error"))
    name = code.name.lower() if code is not None else "router_error"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:  # gRPC's message size limit
        return ApiError(413, f"the request is too large for the router: {details}; send a shorter prompt",
                        code="request_too_large")
    if code == grpc.StatusCode.NOT_FOUND:
        name = "model_not_found" if "family" in details else "not_found"
    return ApiError(status, details, type=kind, code=name)


def install_handlers(app: FastAPI) -> None:
    """Answer ApiError, validation failures and unknown routes in the OpenAI error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request body")
        message = message.removeprefix("Value error, ")
        if loc:
            message = f"{'.'.join(loc)}: {message}"
        return ApiError(400, message, param=loc[0] if loc else None, code="invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no such endpoint {request.method} {request.url.path}; see /v1/models"
        return ApiError(exc.status_code, message).response()
