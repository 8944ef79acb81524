"""`mesh demo`: a whole mesh on this machine (a router and N expert processes) streaming one answer."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from mesh_llm.cli.display import StreamPrinter, print_stream
from mesh_llm.errors import MeshError
from mesh_llm.models.catalog import resolve
from mesh_llm.models.fetch import pull
from mesh_llm.models.loading import checkpoint_for
from mesh_llm.node import RouterConfig, RunningRouter, start_router
from mesh_llm.paths import mesh_home
from mesh_llm.pb import router_pb2
from mesh_llm.router.client import stream_generate

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    model: str = "smollm2-135m"  # model every expert serves
    experts: int = 3  # expert processes to start
    k: int = 2  # experts mixed per token
    prompt: str = "What is the capital of France?"  # question asked through the chat template
    max_tokens: int = 48  # completion cap
    temperature: float = 0.0  # 0 = greedy
    seed: int | None = 1  # selection and sampling seed
    policy: str = "random"  # selection policy
    mix: str = "linear"  # aggregation rule
    quants: tuple[str, ...] = ("none",)  # quantisation per expert, cycled (e.g. none,nf4)
    start_timeout_s: float = 180.0  # longest wait for the experts to join


class DemoError(MeshError):
    """The demo mesh could not be brought up."""


def _expert_command(config: DemoConfig, index: int, invite: str) -> list[str]:
    quant = config.quants[index % len(config.quants)]
    return [sys.executable, "-m", "mesh_llm.cli.expert_cmd", "serve", "--model", config.model, "--port", "0",
            "--host", "127.0.0.1", "--join", invite, "--name", f"expert-{index + 1}" + ("" if quant == "none" else
            f"-{quant}"), "--quant", quant, "--device", "cpu", "--threads", str(max(1, (os.cpu_count() or 2) // 2))]


async def _wait_for_experts(router: RunningRouter, procs: list[subprocess.Popen], logs: list[Path],
                            want: int, timeout_s: float, console: Console) -> None:
    began = time.monotonic()
    with console.status(f"starting {want} experts (loading the model in each)...") as status:
        while True:
            online = [r for r in router.registry.experts() if r.state == "online"]
            status.update(f"experts online: {len(online)}/{want}")
            if len(online) >= want:
                return
            for proc, path in zip(procs, logs):
                if proc.poll() is not None:
                    tail = path.read_text()[-1500:] if path.exists() else ""
                    raise DemoError(f"an expert process exited with code {proc.returncode}; its log "
                                    f"({path}) ends with:\n{tail}")
            if time.monotonic() - began > timeout_s:
                raise DemoError(f"only {len(online)} of {want} experts joined within {timeout_s:.0f} s; "
                                f"see the logs in {logs[0].parent}")
            await asyncio.sleep(0.25)


async def run_demo(config: DemoConfig, console: Console | None = None) -> router_pb2.GenerationDone:
    """Pull the model, start a router and N experts, stream one answer, shut everything down."""
    console = console or Console()
    if config.k > config.experts:
        raise DemoError(f"--k {config.k} is larger than --experts {config.experts}")
    entry = resolve(config.model)
    console.print(f"[bold]mesh demo[/bold]: {config.experts} experts of {entry.name}, k={config.k}")
    await asyncio.to_thread(pull, entry)
    await asyncio.to_thread(checkpoint_for, entry)  # convert once here, not in every expert
    workdir = mesh_home() / "demo"
    workdir.mkdir(parents=True, exist_ok=True)
    db = workdir / "demo.db"
    db.unlink(missing_ok=True)
    router = await start_router(RouterConfig(port=0, db_url=f"sqlite:///{db}"))
    console.print(f"router on {router.address}")
    procs, logs = [], []
    try:
        for index in range(config.experts):
            path = workdir / f"expert-{index + 1}.log"
            logs.append(path)
            with path.open("w") as fh:
                procs.append(subprocess.Popen(_expert_command(config, index, router.invite), stdout=fh,
                                              stderr=subprocess.STDOUT, env=dict(os.environ)))
        await _wait_for_experts(router, procs, logs, config.experts, config.start_timeout_s, console)
        names = {r.expert_id: r.name or r.expert_id for r in router.registry.experts()}
        console.print(f"[bold]prompt:[/bold] {config.prompt}\n[bold]answer:[/bold] ", end="")
        printer = StreamPrinter(console, names)
        request = router_pb2.GenerateRequest(prompt=config.prompt, k=config.k, policy=config.policy, mix=config.mix,
                                             max_tokens=config.max_tokens, temperature=config.temperature,
                                             chat=True, seed=config.seed)
        return await print_stream(printer, stream_generate(router.address, request))
    finally:
        for proc in procs:
            proc.terminate()  # a graceful stop: each expert deregisters, so the router keeps serving meanwhile
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
        await router.stop(0)
