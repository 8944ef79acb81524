"""Resumable generations: checkpoints in the store, a router killed with SIGKILL and restarted, and
`mesh generate --resume ID` producing the text of an uninterrupted run."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys

import grpc
import pytest

from mesh_llm.expert.server import ExpertConfig, resolve_join, start_expert
from mesh_llm.grpc_util import channel
from mesh_llm.models.loading import LoadOptions, load
from mesh_llm.node import RouterConfig
from mesh_llm.pb import router_pb2, router_pb2_grpc
from tests.mesh_helpers import local_mesh

PROMPT = "The capital of France is"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _start_router(port: int, db_url: str, home) -> tuple[subprocess.Popen, str]:
    """A `mesh router serve` process checkpointing every 4 tokens; it and its invite token."""
    proc = subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.main", "router", "serve", "--port", str(port),
                             "--db", db_url, "--checkpoint-every", "4"],
                            env=dict(os.environ, MESH_HOME=str(home)), stdout=subprocess.PIPE,
                            stderr=(home.parent / "router.log").open("a"), text=True)
    while True:
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        assert line, f"router exited ({proc.wait()}) before printing its invite token"
        if m := re.search(r"invite token: (\S+)", line):
            return proc, m.group(1)


async def _online(address: str, n: int, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with channel(address) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        while loop.time() < deadline:
            try:
                status = await stub.GetRouterStatus(router_pb2.RouterStatusRequest(), timeout=2)
                if sum(e.state == "online" for e in status.experts) >= n:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError(f"{n} experts not online at {address} within {timeout} s")


async def _collect(stub, request, *, kill_after: int = 0, proc: subprocess.Popen | None = None):
    """Token events and the summary of one Generate call; SIGKILL proc once kill_after tokens have arrived."""
    tokens, done = [], None
    try:
        async for event in stub.Generate(request, timeout=120):
            if event.HasField("token"):
                tokens.append(event.token)
                if kill_after and len(tokens) == kill_after:
                    proc.send_signal(signal.SIGKILL)
            else:
                done = event.done
    except grpc.aio.AioRpcError:
        assert kill_after, "the stream broke without a kill"
    return tokens, done


async def test_sigkilled_router_resumes_with_the_same_greedy_text(tiny_loaded, tiny_model_dir_b, tmp_path, mesh_home):
    other = load(LoadOptions(model=str(tiny_model_dir_b), device="cpu"))
    port, db_url = _free_port(), f"sqlite:///{tmp_path / 'router.db'}"
    address = f"127.0.0.1:{port}"
    router, invite = await _start_router(port, db_url, mesh_home)
    experts = []
    try:
        joined, secret = resolve_join(None, invite)
        for loaded in (tiny_loaded, other):  # slowed down so the router cannot run far ahead of the stream
            experts.append(await start_expert(ExpertConfig(load=LoadOptions(model=loaded.model_id), port=0,
                                                           measure_speed=False, router=joined, secret=secret,
                                                           delay_ms=60), loaded))
        await _online(address, 2)
        request = router_pb2.GenerateRequest(prompt=PROMPT, k=2, max_tokens=20, seed=3, chat=False)
        async with channel(address) as ch:
            reference, reference_done = await _collect(router_pb2_grpc.RouterStub(ch), request)
        assert reference_done.finish_reason == "length" and len(reference) == 20
        async with channel(address) as ch:
            seen, done = await _collect(router_pb2_grpc.RouterStub(ch), request, kill_after=10, proc=router)
        assert done is None and len(seen) == 10
        generation_id = seen[0].generation_id
        assert generation_id.startswith("g-") and [t.token_id for t in seen] == [t.token_id for t in reference[:10]]
        router.wait(10)
        router, _ = await _start_router(port, db_url, mesh_home)
        await _online(address, 2)
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mesh_llm.cli.main", "generate", "--resume", generation_id, "--router", address,
            env=dict(os.environ, MESH_HOME=str(mesh_home), COLUMNS="400"), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(cli.communicate(), 120)
        assert cli.returncode == 0, err.decode()[-2000:]
        assert reference_done.text and reference_done.text in out.decode()
        assert "finish: length · 20 tokens" in out.decode()
        async with channel(address) as ch:  # finished now: a second resume is refused and says why
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in router_pb2_grpc.RouterStub(ch).Generate(
                        router_pb2.GenerateRequest(resume_id=generation_id), timeout=30):
                    pass
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "already finished (length)" in refused.value.details()
    finally:
        router.kill()
        router.wait(10)
        for expert in experts:
            await expert.stop(0)


async def test_a_cancelled_sampled_generation_resumes_with_the_same_tokens(tiny_loaded, tiny_model_dir_b, tmp_path):
    other = load(LoadOptions(model=str(tiny_model_dir_b), device="cpu"))
    config = RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret", checkpoint_every=3)
    fields = dict(prompt=PROMPT, k=2, max_tokens=16, temperature=0.9, seed=11, chat=False, policy="random")
    async with local_mesh([tiny_loaded, other, tiny_loaded], tmp_path, router_config=config) as mesh:
        reference, _ = await mesh.generate(**fields)
        stream = mesh.stub.Generate(router_pb2.GenerateRequest(**fields), timeout=60)
        seen = []
        async for event in stream:
            seen.append(event.token)
            if len(seen) == 8:
                break
        stream.cancel()  # the client hangs up; the checkpoint at 6 tokens stays resumable
        await asyncio.sleep(0.3)
        resumed, done = await mesh.generate(resume_id=seen[0].generation_id)
    assert [t.token_id for t in resumed] == [t.token_id for t in reference]
    assert [list(t.expert_ids) for t in resumed] == [list(t.expert_ids) for t in reference]
    assert sum(t.replayed for t in resumed) in (6, 9) and done.completion_tokens == len(reference)


async def test_resume_of_an_unknown_generation_says_how_checkpoints_work(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded], tmp_path) as mesh:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.generate(resume_id="g-nothing")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no checkpoint of generation 'g-nothing'" in refused.value.details()
    assert "--checkpoint-every" in refused.value.details()
