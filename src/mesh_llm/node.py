"""A mesh node: router, governance and agent services on one SQL store, gRPC server, sweeps, invite token."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import Counter

from mesh_llm.agent import service as agent_service
from mesh_llm.api.keys import check_keys, load_keys
from mesh_llm.auth import OPERATOR_KEY_FILE, RouterAuth, private_key_file
from mesh_llm.governance import service as governance_service
from mesh_llm.governance.core import Governance
from mesh_llm.grpc_util import TlsFiles, add_health_and_reflection, bind, new_server, set_serving
from mesh_llm.invite import Invite, encode_invite, new_secret
from mesh_llm.pb import router_pb2, router_pb2_grpc
from mesh_llm.router.actions import router_action_registry
from mesh_llm.router.checkpoints import DEFAULT_EVERY, CheckpointStore
from mesh_llm.router.credits import CreditLedger, CreditPolicy
from mesh_llm.router.metrics import router_metrics
from mesh_llm.router.registry import Registry, RegistryConfig
from mesh_llm.router.service import MAX_PROMPT_CHARS, RouterService
from mesh_llm.router.settings import MeshSettings
from mesh_llm.router.shared_settings import ActionFollower, follow
from mesh_llm.store.db import open_engine

log = logging.getLogger(__name__)
SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
SERVICES = [SERVICE, governance_service.SERVICE_NAME, agent_service.SERVICE_NAME]


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    host: str = "127.0.0.1"  # interface to listen on
    port: int = 50050  # 0 picks a free port
    db_url: str | None = None  # SQLAlchemy URL; None = SQLite under MESH_HOME
    secret: str | None = None  # mesh secret; None = the one saved under MESH_HOME (made on first start)
    advertise: str | None = None  # host:port put into the invite token; default host:port bound
    settings: MeshSettings = field(default_factory=MeshSettings)  # generation defaults
    registry: RegistryConfig = field(default_factory=RegistryConfig)  # heartbeat and failure rules
    governance_dir: Path | None = None  # trust root; None = $MESH_GOVERNANCE_DIR, else MESH_HOME/governance
    governance_poll_s: float = 0.2  # how often halts, resumes and due actions from other processes are picked up
    halt_grace_s: float = 0.5  # Generate calls still running this long after a halt are cancelled
    api_keys: tuple[str, ...] = ()  # client keys accepted besides MESH_HOME/api_keys and MESH_HOME/operator_key
    tls: TlsFiles | None = None  # serve TLS with this certificate (its fingerprint goes into the invite token)
    credits: CreditPolicy = field(default_factory=CreditPolicy)  # who goes first when the mesh is busy
    checkpoint_every: int = DEFAULT_EVERY  # completion tokens between generation checkpoints (0 = off)
    max_prompt_chars: int = MAX_PROMPT_CHARS  # longer prompts are refused before any expert is asked


@dataclass(kw_only=True)
class RunningRouter:
    server: grpc.aio.Server  # serving every service of the node
    port: int  # port bound
    service: RouterService  # the servicer
    registry: Registry  # experts
    governance: Governance  # kill switch, proposals, actions and audit on the same store
    invite: str  # token donors pass to --join
    tasks: list[asyncio.Task]  # registry sweep and governance watch
    health: object | None = None  # the health servicer, set NOT_SERVING on stop

    @property
    def address(self) -> str:
        """host:port to dial this router on loopback."""
        return f"127.0.0.1:{self.port}"

    async def stop(self, grace: float = 0.5) -> None:
        """Refuse new calls, let running ones finish within grace, stop background tasks, close channels and store."""
        if self.health is not None:
            await set_serving(self.health, SERVICES, False)
        await self.server.stop(grace)
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.service.close()
        self.registry.flush()
        self.registry.engine.dispose()  # the SQL store: pooled connections closed


def saved_secret() -> str:
    """The mesh secret in MESH_HOME/mesh_secret, made (0600) on first use; refused when others can read it."""
    return private_key_file("mesh_secret", new_secret)


def router_auth(config: RouterConfig, secret: str, registry: Registry) -> RouterAuth:
    """The check of every call: mesh secret, expert tokens, API keys and the operator key; refusals counted."""
    refused = Counter("mesh_router_unauthenticated_calls", "gRPC calls refused for missing or wrong credentials, "
                      "by method", ["method"], registry=router_metrics(registry).registry)
    keys = (*check_keys(config.api_keys), *load_keys(), private_key_file(OPERATOR_KEY_FILE))
    return RouterAuth(secret=secret, client_keys=keys,
                      on_refused=lambda method: refused.labels(method.rsplit("/", 1)[-1]).inc())


def open_governance(engine, config: RouterConfig, settings: MeshSettings, registry: Registry) -> Governance:
    """Governance over the router's store with this router's action handlers registered."""
    actions = router_action_registry(settings=settings, registry=registry)
    return Governance.on_engine(engine, gov_dir=config.governance_dir, registry=actions)


async def start_router(config: RouterConfig) -> RunningRouter:
    """Open the store, start serving the Router and Governance services, and start the background tasks."""
    config.settings.validate()
    if config.governance_poll_s <= 0 or config.halt_grace_s <= 0:
        raise ValueError("governance_poll_s and halt_grace_s must be > 0")
    engine = open_engine(config.db_url)
    registry = Registry(engine, config.registry)
    settings = dataclasses.replace(config.settings)  # governance actions change this live copy
    governance = open_governance(engine, config, settings, registry)  # a stored halt comes back here
    secret = config.secret or saved_secret()
    service = RouterService(registry=registry, settings=settings, secret=secret, governance=governance,
                            halt_grace_s=config.halt_grace_s, credits=CreditLedger(engine),
                            checkpoints=CheckpointStore(engine, config.checkpoint_every), credit_policy=config.credits,
                            max_prompt_chars=config.max_prompt_chars)
    server = new_server(interceptors=[router_auth(config, secret, registry)])
    router_pb2_grpc.add_RouterServicer_to_server(service, server)
    governance_service.add_to_server(server, governance)
    agent_service.add_to_server(server, governance)
    health = add_health_and_reflection(server, SERVICES)
    port = bind(server, config.host, config.port, config.tls)
    await server.start()
    await set_serving(health, SERVICES, True)
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    invite = encode_invite(Invite(router=config.advertise or f"{host}:{port}", secret=secret,
                                  fingerprint=config.tls.fingerprint() if config.tls else ""))
    tasks = [asyncio.create_task(_sweep(registry, governance)),
             asyncio.create_task(governance.watch(config.governance_poll_s)),
             asyncio.create_task(follow(ActionFollower(engine, governance.registry), governance,
                                        config.governance_poll_s))]  # actions other routers on the store apply
    if governance.switch.is_halted:
        log.warning("router starts HALTED (%s): a quorum of `mesh resume` votes lifts it", governance.switch.reason)
    log.info("router serving on %s:%d", config.host, port)
    return RunningRouter(server=server, port=port, service=service, registry=registry, governance=governance,
                         invite=invite, tasks=tasks, health=health)


async def _sweep(registry: Registry, governance: Governance) -> None:
    while True:
        await asyncio.sleep(registry.config.sweep_interval_s)
        await governance.off_loop(registry.sweep)  # its store write may wait on a lock: never on the event loop
