"""Client side of the Router service: status, and streaming generation with clear errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from mesh_llm.errors import MeshError
from mesh_llm.grpc_util import channel
from mesh_llm.pb import router_pb2, router_pb2_grpc

DEFAULT_ROUTER = "127.0.0.1:50050"


class RouterUnavailable(MeshError):
    """The router could not be reached or refused the call."""


class RouterUnreachable(RouterUnavailable):
    """No router answered at the address, or the connection to it broke (it stopped or restarted)."""


def _explain(exc: grpc.aio.AioRpcError, address: str) -> RouterUnavailable:
    answered = ("mesh-refused-by", "router") in tuple(exc.trailing_metadata() or ())
    if exc.code() == grpc.StatusCode.UNAVAILABLE and not answered:
        return RouterUnreachable(f"no router answers at {address} ({exc.details()}); start one with "
                                 "`mesh router serve` or pass --router HOST:PORT")
    return RouterUnavailable(f"router refused: {exc.details()} ({exc.code().name})")


async def router_status(address: str, timeout: float = 5.0, include_gone: bool = False) -> router_pb2.RouterStatus:
    """GetRouterStatus of the router at address (include_gone: with experts gone past the retention period)."""
    async with channel(address) as ch:
        try:
            return await router_pb2_grpc.RouterStub(ch).GetRouterStatus(
                router_pb2.RouterStatusRequest(all=include_gone), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _explain(exc, address) from None


async def stream_generate(address: str, request: router_pb2.GenerateRequest,
                          timeout: float = 3600) -> AsyncIterator[router_pb2.GenerateEvent]:
    """Yield the events of one Generate call; RouterUnavailable with the reason on refusal."""
    async with channel(address) as ch:
        try:
            async for event in router_pb2_grpc.RouterStub(ch).Generate(request, timeout=timeout):
                yield event
        except grpc.aio.AioRpcError as exc:
            raise _explain(exc, address) from None
