"""Starting and stopping an expert node: fetch and load the model, serve gRPC, optionally join a router.

Who may call it: every Expert call must carry the expert's key (auth.ExpertAuth). The key is
MESH_HOME/expert_key (made on first start) unless the config names one; the expert hands it to the router
in RegisterExpert, over the channel that pinned the router's certificate, and the router sends it on every
call. It also names the donor: a restarted expert with the same key and --name keeps its registry row.
By default the expert listens on loopback; a remote router needs --host and --advertise HOST:PORT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh_llm.auth import EXPERT_KEY_FILE, ExpertAuth, private_key_file
from mesh_llm.errors import MeshError
from mesh_llm.expert.engine import StepEngine
from mesh_llm.expert.join import JoinRefused, RouterLink, outbound_host
from mesh_llm.expert.metrics import MetricsServer, serve_metrics
from mesh_llm.expert.service import ExpertService
from mesh_llm.expert.sessions import SessionLimits
from mesh_llm.grpc_util import TlsFiles, add_health_and_reflection, bind, new_server, set_serving
from mesh_llm.invite import Invite, decode_invite
from mesh_llm.models.catalog import resolve
from mesh_llm.models.fetch import ensure_fetched
from mesh_llm.models.loading import LoadedModel, LoadOptions, load
from mesh_llm.pb import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)
SERVICE = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name
DEFAULT_PORT = 50051  # port of an expert that joins no router (one that joins a router takes a free port)


@dataclass(frozen=True, kw_only=True)
class ExpertConfig:
    load: LoadOptions  # which model and how
    host: str = "127.0.0.1"  # interface to listen on
    port: int = DEFAULT_PORT  # 0 picks a free port
    limits: SessionLimits = field(default_factory=SessionLimits)  # session bounds
    router: str | None = None  # host:port of a router to join
    secret: str = ""  # mesh secret for the router
    advertise: str | None = None  # host:port the router should dial; derived when None
    name: str = ""  # donor-chosen label shown by `mesh status`
    max_message_bytes: int = 4 << 20  # largest request or reply
    measure_speed: bool = True  # time a short decode at start for Info.tokens_per_second
    delay_ms: float = 0.0  # emulated network latency added before every Step reply
    metrics_port: int | None = None  # serve Prometheus /metrics on this port (0 picks a free one); None = off
    pull: bool = True  # fetch a catalog model missing from MESH_HOME before loading it (else fail with the fix)
    grace_s: float = 5.0  # on stop, Step calls already running get this long to finish
    key: str | None = None  # key every Expert call must carry; None = MESH_HOME/expert_key
    tls: TlsFiles | None = None  # serve TLS with this certificate (the router pins its fingerprint)
    router_pin: str = ""  # sha256 of the router's TLS certificate (from the invite token); "" = plain TCP


@dataclass(kw_only=True)
class RunningExpert:
    server: object  # grpc.aio.Server
    port: int  # port actually bound
    service: ExpertService  # the servicer (engine inside)
    link: RouterLink | None  # router registration, when joined
    tasks: list[asyncio.Task]  # background tasks to cancel on stop
    metrics: MetricsServer | None = None  # the /metrics HTTP server, when asked for
    health: object | None = None  # the health servicer, set NOT_SERVING on stop

    @property
    def address(self) -> str:
        """host:port to dial this expert on loopback."""
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = 0.5, reason: str = "stopping") -> None:
        """Refuse new calls, deregister from the router, let running calls finish within grace, then close."""
        if self.health is not None:
            await set_serving(self.health, [SERVICE], False)
        stopping = asyncio.create_task(self.server.stop(grace))  # new calls are refused from here on
        for task in self.tasks:  # the router link first: it must not register again
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, JoinRefused):  # a refusal was raised by serve_forever
                await task
        if self.link is not None:
            await self.link.deregister(reason)
        await stopping
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        self.service.shutdown()


def resolve_join(router: str | None, join: str | None) -> tuple[str | None, str]:
    """Router address and secret from --router/--join (the token wins, --router may override its address)."""
    invite = resolve_invite(router, join)
    return invite.router or None, invite.secret


def resolve_invite(router: str | None, join: str | None) -> Invite:
    """Router address, secret and certificate pin from --router/--join (--router may override the address)."""
    if join:
        invite = decode_invite(join)
        return Invite(router=router or invite.router, secret=invite.secret, fingerprint=invite.fingerprint)
    return Invite(router=router or "", secret="")


async def start_expert(config: ExpertConfig, loaded: LoadedModel | None = None) -> RunningExpert:
    """Load (unless given) the model, start serving, mark SERVING, and start joining a router if asked."""
    if loaded is None:
        loaded = await asyncio.to_thread(_fetch_and_load, config)
    engine = StepEngine(loaded, config.limits)
    engine.max_reply_bytes = config.max_message_bytes  # oversized replies are refused before computing
    service = ExpertService(engine, delay_ms=config.delay_ms)
    key = config.key or private_key_file(EXPERT_KEY_FILE)
    server = new_server(config.max_message_bytes, interceptors=[ExpertAuth(key)])
    expert_pb2_grpc.add_ExpertServicer_to_server(service, server)
    health = add_health_and_reflection(server, [SERVICE])
    port = bind(server, config.host, config.port, config.tls)
    await server.start()
    await set_serving(health, [SERVICE], True)
    log.info("expert %s (%s, %s, %s) serving on %s:%d", loaded.model_id, loaded.device, loaded.dtype,
             loaded.quantization, config.host, port)
    metrics = None
    if config.metrics_port is not None:
        try:
            metrics = serve_metrics(service.metrics, config.host, config.metrics_port)
        except Exception:
            await server.stop(0)
            service.shutdown()
            raise
    if config.measure_speed:
        service.start_speed_probe()
    tasks = [asyncio.create_task(_sweep_sessions(service, config.limits.idle_s))]
    link = None
    if config.router:
        advertise = config.advertise or advertised_address(config.host, config.router, port)
        link = RouterLink(router=config.router, secret=config.secret, advertise=advertise,
                          name=config.name or advertise, info=service.info,
                          active_sessions=lambda: len(engine.sessions), expert_key=key,
                          router_pin=config.router_pin, tls_fingerprint=config.tls.fingerprint() if config.tls else "")
        tasks.append(asyncio.create_task(link.run()))
    return RunningExpert(server=server, port=port, service=service, link=link, tasks=tasks, metrics=metrics,
                         health=health)


def advertised_address(host: str, router: str, port: int) -> str:
    """The HOST:PORT a router should dial when --advertise is not given; MeshError when it could not reach it."""
    from mesh_llm.api.keys import is_loopback

    router_host = router.rsplit(":", 1)[0].strip("[]")
    if is_loopback(host):
        if not is_loopback(router_host):
            raise MeshError(f"this expert listens on {host} only, so router {router} cannot dial it: pass "
                            "--host 0.0.0.0 (or this machine's address) and --advertise HOST:PORT the router reaches")
        return f"127.0.0.1:{port}"
    if host in ("0.0.0.0", "::", ""):
        return f"{outbound_host(router)}:{port}"
    return f"{host}:{port}"


def _fetch_and_load(config: ExpertConfig) -> LoadedModel:
    if config.pull:
        ensure_fetched(resolve(config.load.model))
    return load(config.load)


async def _sweep_sessions(service: ExpertService, idle_s: float) -> None:
    while True:
        await asyncio.sleep(max(1.0, min(idle_s / 4, 30.0)))
        await service.sweep_idle()


async def serve_forever(config: ExpertConfig, stop_when: Callable[[], asyncio.Event] | None = None,
                        announce: Callable[[RunningExpert], None] | None = None) -> None:
    """Run an expert until the event stop_when() made once serving is set (or cancelled); stop within grace_s."""
    running = await start_expert(config)
    try:
        stop = stop_when() if stop_when is not None else asyncio.Event()
        if announce is not None:
            announce(running)
        waits = [asyncio.ensure_future(stop.wait()), *running.tasks[1:]]  # the router link ends only when refused
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        waits[0].cancel()
        for task in done:
            if task is not waits[0] and not task.cancelled() and task.exception() is not None:
                raise task.exception()
    finally:
        await running.stop(config.grace_s, reason="shutting down")
