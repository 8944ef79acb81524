"""A lab mesh: a router in this process and N experts (subprocesses or in-process) behind emulated links."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mesh_llm.expert.server import ExpertConfig, RunningExpert, start_expert
from mesh_llm.grpc_util import channel
from mesh_llm.models.loading import LoadedModel, LoadOptions
from mesh_llm.node import RouterConfig, RunningRouter, start_router
from mesh_llm.pb import router_pb2, router_pb2_grpc
from mesh_llm.router.registry import RegistryConfig
from mesh_llm.router.settings import MeshSettings
from meshlab.netem import DelayProxy, LinkSpec, NetemNetwork, choose_backend

log = logging.getLogger(__name__)
NETNS_EXPERT_PORT = 50051


@dataclass(frozen=True, kw_only=True)
class ExpertPlan:
    model: str  # catalog name or checkpoint folder
    quant: str = "none"  # none or nf4
    dtype: str = "float32"  # compute dtype
    device: str = "cpu"  # torch device of the expert
    threads: int = 1  # torch CPU threads of a subprocess expert (0: torch's default)


@dataclass(kw_only=True)
class TokenRecord:
    token_id: int  # sampled id
    at_s: float  # arrival time at the client, seconds after the request was sent
    expert_ids: list[str]  # experts mixed for this token
    calls: list[dict]  # trace: expert_id, used, outcome, latency_ms, reply_bytes
    union_size: int  # ids in the mixed distribution
    router_ms: float  # select + mix + sample time in the router


@dataclass(kw_only=True)
class GenRecord:
    tokens: list[TokenRecord]  # per token, in order
    finish_reason: str  # eos, length, stop, error, halted
    tokens_per_second: float  # router's figure (prompt step included)
    ttft_s: float  # client-side time to first token
    total_s: float  # client-side time to the final event
    notes: list[str]  # degradations the router reported
    text: str  # completion text
    prompt_tokens: int = 0  # prompt length the router reported
    wire_bytes: dict[str, list[int]] = field(default_factory=dict)  # per expert id: [to expert, from expert]


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabMesh:
    """Router + experts for experiments; use `async with LabMesh(...) as mesh`."""

    def __init__(self, *, experts: list[ExpertPlan], workdir: Path, network: str = "auto",
                 launch: str = "subprocess", loaded: dict[str, LoadedModel] | None = None,
                 settings: MeshSettings | None = None, start_timeout_s: float = 300.0):
        if launch not in ("subprocess", "inproc"):
            raise ValueError(f"unknown launch {launch!r}; use subprocess or inproc")
        self.plans = experts
        self.workdir = Path(workdir)
        self.launch = launch
        self.loaded = loaded or {}
        self.settings = settings or MeshSettings(step_deadline_s=30.0)
        self.start_timeout_s = start_timeout_s
        self.backend, self.backend_reason = choose_backend(network, launch)
        self.links = [LinkSpec() for _ in experts]
        self.router: RunningRouter | None = None
        self.ids: list[str] = []  # registry id per expert index
        self._procs: list[subprocess.Popen | None] = [None] * len(experts)
        self._inproc: list[RunningExpert | None] = [None] * len(experts)
        self._addresses: list[str] = [""] * len(experts)  # where the router dials expert i
        self._net = None
        self._channel = None
        self.stub = None

    async def __aenter__(self) -> LabMesh:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the router, the network and every expert; wait until all are registered online."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        host = "0.0.0.0" if self.backend == "netem" else "127.0.0.1"
        self.router = await start_router(RouterConfig(
            host=host, port=0, db_url=f"sqlite:///{self.workdir / 'router.db'}", secret="lab-secret",
            settings=self.settings, registry=RegistryConfig(max_failures=1000)))
        if self.backend == "netem":
            self._net = await asyncio.to_thread(NetemNetwork, len(self.plans))
        elif self.backend == "proxy":
            self._net = DelayProxy()
            self._addresses = [self._net.add() for _ in self.plans]
        await asyncio.gather(*(self._start_expert(i) for i in range(len(self.plans))))
        await self._wait_registered()
        self._channel = channel(self.router.address)
        self.stub = router_pb2_grpc.RouterStub(self._channel)

    def _router_address(self, i: int) -> str:
        if self.backend == "netem":
            return f"{self._net.host_ip[i]}:{self.router.port}"
        return self.router.address

    async def _start_expert(self, i: int) -> None:
        plan = self.plans[i]
        delay = self.links[i].rtt_ms if self.backend == "inproc" else 0.0
        name = f"x{i}"
        if self.launch == "inproc":
            loaded = self.loaded.get(plan.model)
            config = ExpertConfig(load=LoadOptions(model=plan.model, quant=plan.quant, dtype=plan.dtype,
                                                   device=plan.device),
                                  host="127.0.0.1", port=0, router=self.router.address, secret="lab-secret",
                                  advertise=self._addresses[i] or None, name=name, measure_speed=False,
                                  delay_ms=delay)
            if self.backend == "proxy":
                # the relay exists already; the expert advertises it and the relay learns the real port after start
                running = await start_expert(config, loaded)
                self._net.set_target(i, running.address)
            else:
                running = await start_expert(config, loaded)
                self._addresses[i] = running.address
            self._inproc[i] = running
            return
        if self.backend == "netem":
            bind_host, port = self._net.ns_ip[i], NETNS_EXPERT_PORT
            advertise = f"{bind_host}:{port}"
        else:
            bind_host, port = "127.0.0.1", free_port()
            advertise = self._addresses[i] or f"127.0.0.1:{port}"
            if self.backend == "proxy":
                self._net.set_target(i, f"127.0.0.1:{port}")
        self._addresses[i] = advertise
        argv = [sys.executable, "-m", "mesh_llm.cli.expert_cmd", "serve", "--model", plan.model,
                "--quant", plan.quant, "--dtype", plan.dtype, "--device", plan.device, "--host", bind_host,
                "--port", str(port), "--router", self._router_address(i), "--join", self.router.invite,
                "--advertise", advertise, "--name", name, "--threads", str(plan.threads), "--delay-ms", str(delay)]
        if self.backend == "netem":
            argv = self._net.wrap(i, argv)
        log_file = open(self.workdir / f"expert-{i}.log", "ab")  # noqa: SIM115 (closed with the process)
        self._procs[i] = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
        log_file.close()

    async def _wait_registered(self) -> None:
        began = time.monotonic()
        names = [f"x{i}" for i in range(len(self.plans))]
        while True:
            by_name = {r.name: r for r in self.router.registry.experts()
                       if r.state == "online" and r.address in self._addresses}
            if all(n in by_name for n in names):
                self.ids = [by_name[n].expert_id for n in names]
                return
            for i, proc in enumerate(self._procs):
                if proc is not None and proc.poll() is not None:
                    tail = (self.workdir / f"expert-{i}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"expert {i} exited with {proc.returncode}:\n{tail}")
            if time.monotonic() - began > self.start_timeout_s:
                raise TimeoutError(f"experts not registered after {self.start_timeout_s}s: have {sorted(by_name)}")
            await asyncio.sleep(0.1)

    async def set_links(self, specs: list[LinkSpec]) -> None:
        """Apply one link per expert (the inproc backend restarts experts whose delay changed)."""
        if len(specs) != len(self.plans):
            raise ValueError(f"{len(specs)} links for {len(self.plans)} experts")
        if self.backend == "inproc":
            if any(s.jitter_ms or s.loss for s in specs):
                raise ValueError("the inproc backend adds a fixed delay only; jitter and loss need netem or proxy")
            if self.launch == "inproc":  # the servicer reads its delay on every Step
                for running, spec in zip(self._inproc, specs):
                    running.service.delay_s = spec.rtt_ms / 1000
                self.links = list(specs)
                return
            changed = [i for i, s in enumerate(specs) if s.rtt_ms != self.links[i].rtt_ms]
            self.links = list(specs)
            for i in changed:
                await self._stop_expert(i)
                self.router.registry.record_failure(self.ids[i], "restarting")  # cleared by re-registration
            await asyncio.gather(*(self._start_expert(i) for i in changed))
            if changed:
                await self._wait_restarted(changed)
            return
        for i, spec in enumerate(specs):
            await asyncio.to_thread(self._net.set_link, i, spec)
        self.links = list(specs)

    async def _wait_restarted(self, indices: list[int]) -> None:
        """Wait until each restarted expert registered again (registration at the same address resets failures)."""
        began = time.monotonic()
        pending = set(indices)
        while pending:
            pending = {i for i in pending if self.router.registry.get(self.ids[i]).failures > 0}
            if time.monotonic() - began > self.start_timeout_s:
                raise TimeoutError(f"experts {sorted(pending)} did not register again")
            await asyncio.sleep(0.1)

    async def measure_rtt_ms(self, i: int, probes: int = 5) -> float:
        """Median round trip of a gRPC health check through expert i's link (the inproc delay is not seen)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        times = []
        async with channel(self._addresses[i]) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=30)  # connect first
            for _ in range(probes):
                began = time.perf_counter()
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=30)
                times.append((time.perf_counter() - began) * 1000)
        times.sort()
        return times[len(times) // 2]

    def inproc_expert(self, i: int) -> RunningExpert:
        """The running in-process expert i (launch inproc only)."""
        running = self._inproc[i]
        if running is None:
            raise RuntimeError(f"expert {i} is not running in this process")
        return running

    def wire_snapshot(self) -> dict[str, list[int]]:
        """Bytes each way through each expert's relay so far (proxy backend only; empty otherwise)."""
        if self.backend != "proxy":
            return {}
        return {eid: list(self._net.wire_bytes[i]) for i, eid in enumerate(self.ids)}

    async def generate(self, prompt: str, **fields) -> GenRecord:
        """One Generate call with traces on; per-token arrival times measured at the client."""
        before = self.wire_snapshot()
        record = await stream_generate(self.stub, prompt, **fields)
        after = self.wire_snapshot()
        record.wire_bytes = {eid: [after[eid][0] - before[eid][0], after[eid][1] - before[eid][1]] for eid in after}
        return record

    async def kill_expert(self, i: int) -> None:
        """Stop expert i abruptly (the router finds out by itself)."""
        await self._stop_expert(i)

    async def _stop_expert(self, i: int) -> None:
        proc = self._procs[i]
        if proc is not None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 10)
            self._procs[i] = None
        running = self._inproc[i]
        if running is not None:
            await running.stop(0)
            self._inproc[i] = None

    async def stop(self) -> None:
        """Stop experts, router, relays and namespaces."""
        for i in range(len(self.plans)):
            with contextlib.suppress(Exception):
                await self._stop_expert(i)
        if self._channel is not None:
            await self._channel.close()
        if self.router is not None:
            await self.router.stop(0)
        if self._net is not None:
            await asyncio.to_thread(self._net.close)
            self._net = None


def _call(c) -> dict:
    """One ExpertCall of a trace as a dict (compute_ms too when this build's trace carries it)."""
    call = {"expert_id": c.expert_id, "used": c.used, "outcome": c.outcome, "latency_ms": c.latency_ms,
            "reply_bytes": c.reply_bytes}
    if "compute_ms" in c.DESCRIPTOR.fields_by_name:
        call["compute_ms"] = c.compute_ms
    return call


async def stream_generate(stub, prompt: str, on_token=None, **fields) -> GenRecord:
    """Run one traced Generate to the end; on_token(TokenRecord, index) is awaited after each token."""
    request = router_pb2.GenerateRequest(prompt=prompt, trace=True, **fields)
    tokens: list[TokenRecord] = []
    done = None
    began = time.perf_counter()
    async for event in stub.Generate(request, timeout=3600):
        now = time.perf_counter() - began
        if event.HasField("token"):
            t = event.token
            tokens.append(TokenRecord(
                token_id=t.token_id, at_s=now, expert_ids=list(t.expert_ids),
                calls=[_call(c) for c in t.trace.calls],
                union_size=t.trace.union_size, router_ms=t.trace.router_ms))
            if on_token is not None:
                await on_token(tokens[-1], len(tokens) - 1)
        else:
            done = event.done
    return GenRecord(tokens=tokens, finish_reason=done.finish_reason, tokens_per_second=done.tokens_per_second,
                     ttft_s=tokens[0].at_s if tokens else float("nan"), total_s=time.perf_counter() - began,
                     notes=list(done.notes), text=done.text, prompt_tokens=done.prompt_tokens)
