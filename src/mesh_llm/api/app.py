"""The FastAPI app of the router's HTTP port: OpenAI-compatible /v1, /console and /metrics."""

from __future__ import annotations

from fastapi import Depends, FastAPI, Request

from mesh_llm.api import console, openai_routes
from mesh_llm.api.errors import ApiError, install_handlers
from mesh_llm.api.keys import is_loopback, key_matches
from mesh_llm.api.mesh import ApiContext

ROUTES = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/console", "/console/api/status", "/metrics"}


async def require_key(request: Request) -> None:
    """Refuse (401) a request without a valid `Authorization: Bearer` key when keys are configured."""
    keys = request.app.state.ctx.keys
    if not keys or (request.url.path == "/metrics" and request.client is not None
                     and is_loopback(request.client.host)):
        return  # a Prometheus scrape on this machine needs no key
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key_matches(token.strip(), keys):
        raise ApiError(401, "missing or invalid API key: send `Authorization: Bearer <key>` with a key this "
                       "router accepts (mesh router serve --api-key, or MESH_HOME/api_keys)",
                       code="invalid_api_key")


class CountRequests:
    """ASGI middleware counting HTTP requests by route and status into the router's metrics."""

    def __init__(self, app, ctx: ApiContext) -> None:
        """Wrap app."""
        self.app = app
        self.counter = ctx.metrics.http_requests

    async def __call__(self, scope, receive, send) -> None:
        """Pass the request on; count it when the response starts (or fails)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            path = scope.get("path", "")
            route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            self.counter.labels(route, str(status)).inc()


def create_app(ctx: ApiContext) -> FastAPI:
    """The app for this context: every route but the console page behind the key check."""
    app = FastAPI(title="mesh-llm", description="OpenAI-compatible API of a mesh-llm router",
                  docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    install_handlers(app)
    app.include_router(openai_routes.router, dependencies=[Depends(require_key)])
    app.include_router(console.keyed, dependencies=[Depends(require_key)])
    app.include_router(console.pages)
    app.add_middleware(CountRequests, ctx=ctx)
    return app
