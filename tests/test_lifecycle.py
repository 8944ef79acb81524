"""Graceful stop (issue 12.1): SIGTERM / SIGINT let running work finish, deregister, close the store, exit 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import grpc
import pytest

from mesh_llm.expert.server import ExpertConfig, resolve_join, start_expert
from mesh_llm.grpc_util import channel
from mesh_llm.models.loading import LoadOptions
from mesh_llm.pb import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from mesh_llm.router.registry import ExpertSpec, Registry
from mesh_llm.store.db import open_engine
from tests.mesh_helpers import local_mesh

EXIT_TIMEOUT_S = 15  # grace (5 s) plus start-up slack on a loaded 2-core machine


def _ignore_sigint() -> None:
    """What a non-interactive shell does to a job started with `&`: the earlier attempt hung on exactly this."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


async def _read_line(proc: subprocess.Popen, pattern: str, timeout_s: float = 120) -> re.Match:
    """The first stdout line of proc matching pattern (the process is still running)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), deadline - time.monotonic())
        except asyncio.TimeoutError:
            break
        if not line:
            raise AssertionError(f"process ended (code {proc.wait()}) before printing {pattern!r}")
        if m := re.search(pattern, line):
            return m
    raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s")


async def _wait_state(registry, expert_id: str, state: str, timeout_s: float) -> float:
    """Seconds until the expert reaches state in the registry (fails after timeout_s)."""
    began = time.monotonic()
    while registry.get(expert_id).state != state:
        assert time.monotonic() - began < timeout_s, f"{expert_id} still {registry.get(expert_id).state}"
        await asyncio.sleep(0.02)
    return time.monotonic() - began


def _spec() -> ExpertSpec:
    return ExpertSpec(model_id="m", tokenizer_fingerprint="f", vocab_size=10, context_limit=64)


def test_deregister_marks_gone_at_once_and_keeps_a_quarantine(tmp_path):
    registry = Registry(open_engine(f"sqlite:///{tmp_path / 'r.db'}"))
    a = registry.register("h:1", _spec())
    b = registry.register("h:2", _spec())
    registry.quarantine(b, "bad replies")
    assert registry.deregister(a, reason="SIGTERM") and registry.get(a).state == "gone"
    assert not registry.heartbeat(a)  # it must register again to come back
    assert registry.deregister(b) and registry.get(b).state == "quarantined"
    assert not registry.deregister("e-unknown")
    assert [c.expert_id for c in registry.candidates()] == []


async def test_deregister_rpc_needs_the_mesh_secret(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded], tmp_path) as mesh:
        expert_id = mesh.experts[0].link.expert_id
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.stub.Deregister(router_pb2.DeregisterRequest(mesh_secret="wrong", expert_id=expert_id))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert mesh.router.registry.get(expert_id).state == "online"
        await mesh.experts[0].stop(0)  # a stopping expert deregisters itself
        assert mesh.router.registry.get(expert_id).state == "gone"


async def test_expert_sigterm_finishes_running_step_deregisters_and_exits_0(tiny_model_dir, tmp_path, mesh_home):
    from mesh_llm.node import RouterConfig, start_router

    router = await start_router(RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'r.db'}", secret="s"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh_llm.cli.expert_cmd", "serve", "--model", str(tiny_model_dir), "--host",
         "127.0.0.1", "--device", "cpu", "--join", router.invite, "--delay-ms", "1500"],
        env=dict(os.environ, MESH_HOME=str(mesh_home)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        port = int((await _read_line(proc, r"expert serving on port (\d+)")).group(1))
        deadline = time.monotonic() + 30
        while not [e for e in router.registry.experts() if e.state == "online"]:
            assert time.monotonic() < deadline, "the expert did not register"
            await asyncio.sleep(0.1)
        expert_id = router.registry.experts()[0].expert_id
        async with channel(f"127.0.0.1:{port}") as ch:
            stub = expert_pb2_grpc.ExpertStub(ch)
            request = expert_pb2.StepRequest(session_id="s", tokens=[1, 2, 3], top_k=4)
            running = asyncio.ensure_future(stub.Step(request, timeout=30))
            await asyncio.sleep(0.5)  # the step is now under way (1.5 s of emulated latency)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            gone_after = await _wait_state(router.registry, expert_id, "gone", 1.5)  # heartbeat timeout is 5 s
            reply = await running  # finished within the grace period, not cut off
            assert len(reply.distributions) == 1 and reply.session_length == 3
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # no new work once stopping
                await stub.Step(expert_pb2.StepRequest(session_id="t", tokens=[1], top_k=4), timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        code = await asyncio.to_thread(proc.wait, EXIT_TIMEOUT_S)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        err = proc.communicate()[1]
        await router.stop(0)
    assert code == 0, err[-3000:]
    assert "deregistered from router" in err
    print(f"expert: gone in the registry {gone_after:.2f} s and exited {took:.2f} s after SIGTERM")


async def test_router_sigint_lets_a_generation_finish_flushes_the_store_and_exits_0(tiny_loaded, tmp_path, mesh_home):
    db = tmp_path / "router.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh_llm.cli.main", "router", "serve", "--port", "0", "--db", f"sqlite:///{db}"],
        env=dict(os.environ, MESH_HOME=str(mesh_home), COLUMNS="80"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=_ignore_sigint)
    expert = None
    try:
        port = int((await _read_line(proc, r"router serving on \S+:(\d+)")).group(1))
        invite = (await _read_line(proc, r"invite token: (\S+)")).group(1)
        address, secret = resolve_join(None, invite)
        expert = await start_expert(ExpertConfig(load=LoadOptions(model=tiny_loaded.model_id), port=0,
                                                 measure_speed=False, router=address, secret=secret, delay_ms=250),
                                    tiny_loaded)
        await asyncio.wait_for(expert.link.registered.wait(), 30)
        tokens, done = [], None
        async with channel(f"127.0.0.1:{port}") as ch:
            request = router_pb2.GenerateRequest(prompt="The capital of France is", k=1, max_tokens=8, chat=False)
            async for event in router_pb2_grpc.RouterStub(ch).Generate(request, timeout=60):
                if event.HasField("token"):
                    tokens.append(event.token)
                    if len(tokens) == 1:
                        sent = time.monotonic()
                        proc.send_signal(signal.SIGINT)  # a parent that ignores SIGINT passed that on
                else:
                    done = event.done
        assert done is not None and done.finish_reason in ("length", "eos"), done
        code = await asyncio.to_thread(proc.wait, EXIT_TIMEOUT_S)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        err = proc.communicate()[1]
        if expert is not None:
            await expert.stop(0)
    assert code == 0, err[-3000:]
    with sqlite3.connect(db) as conn:  # the registry's counters were written before the store was closed
        served = conn.execute("select tokens_served from experts").fetchall()
    assert served == [(len(tokens),)], (served, len(tokens))
    print(f"router: exited {took:.2f} s after SIGINT, {len(tokens)} tokens streamed to the end")


def test_a_step_still_running_after_the_grace_period_does_not_hold_the_exit():
    # a model step outlasting the grace keeps a non-daemon worker thread busy: the interpreter would wait for it
    script = ("import threading, time\n"
              "from mesh_llm.cli.expert_cmd import leave_busy_threads\n"
              "threading.Thread(target=time.sleep, args=(60,), name='expert-step_0').start()\n"
              "leave_busy_threads(time.monotonic() + 1.0)\n"
              "raise SystemExit(3)  # not reached: it left while the thread was busy\n")
    began = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)
    assert done.returncode == 0 and "expert-step_0 still busy" in done.stderr, done.stderr
    assert time.monotonic() - began < 10
