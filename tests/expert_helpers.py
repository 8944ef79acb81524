"""Helpers for tests that talk to a real expert server."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from mesh_llm.expert.server import ExpertConfig, start_expert
from mesh_llm.expert.sessions import SessionLimits
from mesh_llm.grpc_util import channel
from mesh_llm.models.loading import LoadOptions
from mesh_llm.pb import expert_pb2, expert_pb2_grpc
from mesh_llm.wire import decode_topk


@contextlib.asynccontextmanager
async def running_expert(loaded, limits: SessionLimits = SessionLimits(), **kw):
    """Start an expert for an already loaded model on a free port; yield (running, stub)."""
    config = ExpertConfig(load=LoadOptions(model=loaded.model_id), port=0, limits=limits, measure_speed=False, **kw)
    running = await start_expert(config, loaded)
    try:
        async with channel(running.address) as ch:
            yield running, expert_pb2_grpc.ExpertStub(ch)
    finally:
        await running.stop(0)


def reference_logprobs(loaded, tokens: list[int]) -> np.ndarray:
    """log_softmax of the model's logits at every position of one full forward pass, no cache."""
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def decode_reply(reply: expert_pb2.StepReply, vocab_size: int):
    """Every distribution of a StepReply as SparseDist."""
    return [decode_topk(d, reply.encoding, vocab_size) for d in reply.distributions]
