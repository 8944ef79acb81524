"""Joining a router: RegisterExpert with the mesh secret, then heartbeats with the token it returned.

Retries with backoff while no router answers; gives up (JoinRefused, with the router's reason) after
`max_refusals` registrations in a row refused for their credentials, or at once when the router presents
a TLS certificate other than the one the invite token pinned.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable

import grpc

from mesh_llm.auth import Credentials
from mesh_llm.errors import MeshError
from mesh_llm.grpc_util import CertificateMismatch, channel
from mesh_llm.pb import expert_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class JoinRefused(MeshError):
    """The router refused this expert's credentials (or its certificate is not the pinned one)."""


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
                 max_backoff_s: float = 10.0, expert_key: str = "", router_pin: str = "", tls_fingerprint: str = "",
                 max_refusals: int = 3):
        """Join router (pinning its certificate when router_pin is given) with the mesh secret and this key."""
        self.router = router
        self.secret = secret
        self.expert_key = expert_key  # the router calls this expert with it
        self.router_pin = router_pin  # sha256 of the router's TLS certificate; "" = plain TCP
        self.tls_fingerprint = tls_fingerprint  # sha256 of this expert's own certificate; "" = no TLS
        self.max_refusals = max_refusals
        self.token = ""  # the router's credential for this expert's heartbeats
        self.advertise = advertise
        self.name = name
        self.info = info
        self.active_sessions = active_sessions
        self.max_backoff_s = max_backoff_s
        self.expert_id: str | None = None
        self.registered = asyncio.Event()

    def _channel(self) -> grpc.aio.Channel:
        return channel(self.router, credentials=Credentials(pin=self.router_pin))

    async def run(self) -> None:
        """Register, heartbeat, and re-register whenever the router forgets us; JoinRefused when refused."""
        backoff, refusals = 0.5, 0
        while True:
            try:
                async with self._channel() as ch:
                    stub = router_pb2_grpc.RouterStub(ch)
                    interval = await self._register(stub)
                    backoff, refusals = 0.5, 0
                    await self._heartbeat_until_forgotten(stub, interval)
            except CertificateMismatch as exc:
                raise JoinRefused(str(exc)) from None
            except (grpc.aio.AioRpcError, MeshError) as exc:
                self.registered.clear()
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in REFUSED:
                    refusals += 1
                    log.error("router %s refused this expert (%d/%d): %s", self.router, refusals,
                              self.max_refusals, exc.details())
                    if refusals >= self.max_refusals:
                        raise JoinRefused(f"router {self.router} refused this expert {refusals} times: "
                                          f"{exc.details()} (check the --join token)") from None
                else:
                    reason = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                    log.warning("router %s not reachable (%s); retrying in %.1fs", self.router, reason, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    async def _register(self, stub) -> float:
        reply = await stub.RegisterExpert(router_pb2.RegisterExpertRequest(
            address=self.advertise, info=self.info(), name=self.name, expert_key=self.expert_key,
            access_key=self.expert_key, tls_fingerprint=self.tls_fingerprint), timeout=5,
            metadata=Credentials(bearer=self.secret).metadata())
        self.expert_id, self.token = reply.expert_id, reply.expert_token
        self.registered.set()
        log.info("registered with router %s as %s", self.router, reply.expert_id)
        return reply.heartbeat_interval_s or 1.0

    async def _heartbeat_until_forgotten(self, stub, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            reply = await stub.Heartbeat(router_pb2.HeartbeatRequest(
                expert_id=self.expert_id, active_sessions=self.active_sessions(),
                tokens_per_second=self.info().tokens_per_second), timeout=max(interval * 2, 2.0),
                metadata=Credentials(bearer=self.token).metadata())
            if not reply.known:
                log.info("router %s forgot this expert; registering again", self.router)
                self.registered.clear()
                return

    async def deregister(self, reason: str, timeout_s: float = 2.0) -> bool:
        """Tell the router this expert is leaving, so it is gone at once; False if the router did not hear it."""
        if self.expert_id is None:
            return False
        try:
            async with self._channel() as ch:
                reply = await router_pb2_grpc.RouterStub(ch).Deregister(router_pb2.DeregisterRequest(
                    expert_id=self.expert_id, reason=reason), timeout=timeout_s,
                    metadata=Credentials(bearer=self.token).metadata())
        except (grpc.aio.AioRpcError, MeshError) as exc:
            why = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            log.warning("could not deregister from router %s (%s); it will notice within its heartbeat timeout",
                        self.router, why)
            return False
        self.registered.clear()
        log.info("deregistered from router %s (%s)", self.router, self.expert_id)
        return reply.known
