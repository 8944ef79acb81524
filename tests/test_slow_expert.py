"""The real default model behind `mesh-expert serve`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh_llm.grpc_util import channel
from mesh_llm.pb import expert_pb2, expert_pb2_grpc
from mesh_llm.wire import decode_topk
from tests.real_model import free_port, real_mesh_home  # noqa: F401

pytestmark = pytest.mark.slow


async def wait_serving(address: str, deadline_s: float) -> None:
    """Poll standard health checking until SERVING or the deadline passes."""
    end = time.monotonic() + deadline_s
    async with channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{address} not SERVING after {deadline_s}s")


async def test_mesh_expert_serve_answers_paris(real_mesh_home):  # noqa: F811
    from transformers import AutoTokenizer

    from mesh_llm.models.catalog import DEFAULT_MODEL, resolve

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mesh_llm.cli.expert_cmd", "serve", "--port", str(port),
                             "--host", "127.0.0.1", "--model", DEFAULT_MODEL], env=dict(os.environ))
    try:
        await wait_serving(f"127.0.0.1:{port}", 120)
        tokenizer = AutoTokenizer.from_pretrained(resolve(DEFAULT_MODEL).converted_dir)
        ids = tokenizer("The capital of France is").input_ids
        async with channel(f"127.0.0.1:{port}") as ch:
            stub = expert_pb2_grpc.ExpertStub(ch)
            info = await stub.Info(expert_pb2.InfoRequest())
            assert info.vocab_size == 49152 and info.context_limit == 8192
            reply = await stub.Step(expert_pb2.StepRequest(session_id="paris", tokens=ids, top_k=256))
        dist = decode_topk(reply.distributions[0], reply.encoding, info.vocab_size)
        top1 = int(dist.ids[dist.logprobs.argmax()])
        assert tokenizer.decode([top1]) == " Paris"
        assert reply.ByteSize() <= 2048
    finally:
        proc.terminate()
        proc.wait(timeout=30)
