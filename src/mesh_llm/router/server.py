"""Starting and stopping a router: registry on the SQL store, gRPC service, health sweeps, invite token."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass, field

from mesh_llm.grpc_util import add_health_and_reflection, bind, new_server, set_serving
from mesh_llm.invite import Invite, encode_invite, new_secret
from mesh_llm.paths import mesh_home
from mesh_llm.pb import router_pb2, router_pb2_grpc
from mesh_llm.router.registry import Registry, RegistryConfig
from mesh_llm.router.service import HaltState, RouterService
from mesh_llm.router.settings import MeshSettings
from mesh_llm.store.db import open_engine

log = logging.getLogger(__name__)
SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    host: str = "127.0.0.1"  # interface to listen on
    port: int = 50050  # 0 picks a free port
    db_url: str | None = None  # SQLAlchemy URL; None = SQLite under MESH_HOME
    secret: str | None = None  # mesh secret; None = the one saved under MESH_HOME (made on first start)
    advertise: str | None = None  # host:port put into the invite token; default host:port bound
    settings: MeshSettings = field(default_factory=MeshSettings)  # generation defaults
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # heartbeat and failure rules


@dataclass(kw_only=True)
class RunningRouter:
    server: object  # grpc.aio.Server
    port: int  # port bound
    service: RouterService  # the servicer
    registry: Registry  # experts
    invite: str  # token donors pass to --join
    tasks: list[asyncio.Task]  # background sweeps

    @property
    def address(self) -> str:
        """host:port to dial this router on loopback."""
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = 0.5) -> None:
        """Stop sweeps, the server and expert channels; flush the registry."""
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.server.stop(grace)
        await self.service.close()
        self.registry.flush()


def saved_secret() -> str:
    """The mesh secret kept in MESH_HOME/mesh_secret, created (mode 0600) on first use."""
    path = mesh_home() / "mesh_secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(new_secret())
    return path.read_text().strip()


async def start_router(config: RouterConfig) -> RunningRouter:
    """Open the store, start serving the Router service, and start the registry sweep."""
    config.settings.validate()
    engine = open_engine(config.db_url)
    registry = Registry(engine, config.registry)
    secret = config.secret or saved_secret()
    halt = HaltState()
    service = RouterService(registry=registry, settings=config.settings, secret=secret, halt=halt)
    server = new_server()
    router_pb2_grpc.add_RouterServicer_to_server(service, server)
    health = add_health_and_reflection(server, [SERVICE])
    port = bind(server, config.host, config.port)
    await server.start()
    await set_serving(health, [SERVICE], True)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    invite = encode_invite(Invite(router=config.advertise or f"{host}:{port}", secret=secret))
    tasks = [asyncio.create_task(_sweep(registry))]
    log.info("router serving on %s:%d", config.host, port)
    return RunningRouter(server=server, port=port, service=service, registry=registry, invite=invite, tasks=tasks)


async def _sweep(registry: Registry) -> None:
    while True:
        await asyncio.sleep(registry.config.sweep_interval_s)
        registry.sweep()
