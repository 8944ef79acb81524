"""Starting and stopping the HTTP API beside a running router, on the router's own asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

import uvicorn

from mesh_llm.api.app import create_app
from mesh_llm.api.keys import check_keys, is_loopback, keys_file, load_keys
from mesh_llm.api.mesh import MESH_MODEL, ApiContext
from mesh_llm.errors import MeshError
from mesh_llm.router.metrics import router_metrics

log = logging.getLogger(__name__)
DEFAULT_API_PORT = 9337


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    host: str = "127.0.0.1"  # interface to listen on; loopback unless the operator opens it
    port: int = DEFAULT_API_PORT  # 0 picks a free port
    keys: tuple[str, ...] = ()  # API keys accepted besides those in MESH_HOME/api_keys
    use_keys_file: bool = True  # also accept the keys in MESH_HOME/api_keys
    console: bool = False  # serve /console
    shutdown_grace_s: float = 1.0  # open streams get this long to finish on stop


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host program."""

    @contextlib.contextmanager
    def capture_signals(self):
        """Install no signal handlers (Ctrl-C belongs to the CLI that runs the router)."""
        yield


@dataclass(kw_only=True)
class RunningApi:
    server: uvicorn.Server  # the uvicorn server
    task: asyncio.Task  # its serve() task on the router's loop
    host: str  # interface bound
    port: int  # port bound
    context: ApiContext  # what the routes serve from

    @property
    def base_url(self) -> str:
        """http://host:port/v1 for OpenAI clients (loopback when bound to every interface)."""
        return f"{self.origin}/v1"

    @property
    def origin(self) -> str:
        """http://host:port of this API."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop accepting requests, give open streams the grace period, then end the server task."""
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), self.server.config.timeout_graceful_shutdown + 5)
        except asyncio.TimeoutError:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise MeshError(f"could not listen on {host}:{port} for the HTTP API ({exc}); is the port in use? "
                        "pick another with --api-port") from None


async def start_api(router, config: ApiConfig) -> RunningApi:
    """Serve the OpenAI-compatible API (and /console, /metrics) for a RunningRouter on this loop."""
    keys = check_keys((*config.keys, *(load_keys() if config.use_keys_file else [])))
    metrics = router_metrics(router.registry)
    metrics.watch_mesh(router.registry.experts, lambda: router.governance.switch.is_halted)
    ctx = ApiContext(router_address=router.address, registry=router.registry, service=router.service,
                     governance=router.governance, metrics=metrics, keys=keys, console=config.console)
    if not keys and not is_loopback(config.host):
        log.warning("the HTTP API listens on %s without API keys: anyone who reaches it can generate; "
                    "pass --api-key or put keys in %s", config.host, keys_file())
    sock = _listen(config.host, config.port)
    uv_config = uvicorn.Config(create_app(ctx), log_config=None, access_log=False, lifespan="off",
                               timeout_graceful_shutdown=config.shutdown_grace_s, log_level="warning")
    server = _EmbeddedServer(uv_config)
    port = sock.getsockname()[1]
    task = asyncio.create_task(server.serve(sockets=[sock]), name="mesh-http-api")
    while not server.started:
        if task.done():
            sock.close()
            exc = task.exception()
            raise MeshError(f"the HTTP API did not start: {exc!r}")
        await asyncio.sleep(0.01)
    log.info("HTTP API on http://%s:%d/v1%s", config.host, port, " and /console" if config.console else "")
    return RunningApi(server=server, task=task, host=config.host, port=port, context=ctx)


def client_settings(api: RunningApi) -> list[str]:
    """Ready-to-paste lines for OpenAI clients: base URL, key and model name."""
    key = api.context.keys[0] if api.context.keys else "none-needed"
    lines = [f"export OPENAI_BASE_URL={api.base_url}",
             f"export OPENAI_API_KEY={key}",
             f"model: {MESH_MODEL}   (the K-of-N mixture; /v1/models lists each expert family too)",
             f"curl {api.base_url}/models" + (f" -H 'Authorization: Bearer {key}'" if api.context.keys else "")]
    if api.context.console:
        lines.append(f"console: {api.origin}/console")
    lines.append(f"metrics: {api.origin}/metrics")
    return lines
