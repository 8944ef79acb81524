"""Joining a router: RegisterExpert, then heartbeats; retries with backoff while no router answers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import grpc

from mesh_llm.grpc_util import channel
from mesh_llm.pb import expert_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


def outbound_host(router: str) -> str:
    """The local address this machine would use to reach the router (loopback for a local router)."""
    host = router.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP connect sends nothing; it only picks the route
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


class RouterLink:
    """Keeps an expert registered with one router for as long as it runs."""

    def __init__(self, *, router: str, secret: str, advertise: str, name: str,
                 info: Callable[[], expert_pb2.ExpertInfo], active_sessions: Callable[[], int],
                 max_backoff_s: float = 10.0):
        self.router = router
        self.secret = secret
        self.advertise = advertise
        self.name = name
        self.info = info
        self.active_sessions = active_sessions
        self.max_backoff_s = max_backoff_s
        self.expert_id: str | None = None
        self.registered = asyncio.Event()

    async def run(self) -> None:
        """Register, heartbeat, and re-register whenever the router forgets us; never returns on its own."""
        backoff = 0.5
        async with channel(self.router) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            while True:
                try:
                    interval = await self._register(stub)
                    backoff = 0.5
                    await self._heartbeat_until_forgotten(stub, interval)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                        log.error("router %s refused this expert: %s (check the --join token)",
                                  self.router, exc.details())
                    else:
                        log.warning("router %s not reachable (%s); retrying in %.1fs",
                                    self.router, exc.code().name, backoff)
                    self.registered.clear()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)

    async def _register(self, stub) -> float:
        reply = await stub.RegisterExpert(router_pb2.RegisterExpertRequest(
            mesh_secret=self.secret, address=self.advertise, info=self.info(), name=self.name), timeout=5)
        self.expert_id = reply.expert_id
        self.registered.set()
        log.info("registered with router %s as %s", self.router, reply.expert_id)
        return reply.heartbeat_interval_s or 1.0

    async def _heartbeat_until_forgotten(self, stub, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            reply = await stub.Heartbeat(router_pb2.HeartbeatRequest(
                mesh_secret=self.secret, expert_id=self.expert_id, active_sessions=self.active_sessions(),
                tokens_per_second=self.info().tokens_per_second), timeout=max(interval * 2, 2.0))
            if not reply.known:
                log.info("router %s forgot this expert; registering again", self.router)
                self.registered.clear()
                return

    async def deregister(self, reason: str, timeout_s: float = 2.0) -> bool:
        """Tell the router this expert is leaving, so it is gone at once; False if the router did not hear it."""
        if self.expert_id is None:
            return False
        try:
            async with channel(self.router) as ch:
                reply = await router_pb2_grpc.RouterStub(ch).Deregister(router_pb2.DeregisterRequest(
                    mesh_secret=self.secret, expert_id=self.expert_id, reason=reason), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not deregister from router %s (%s); it will notice within its heartbeat timeout",
                        self.router, exc.code().name)
            return False
        self.registered.clear()
        log.info("deregistered from router %s (%s)", self.router, self.expert_id)
        return reply.known
