"""Lightweight replay experts: real gRPC Expert servers that answer Step with recorded top-k replies.

A replay expert keeps no model: it tracks session lengths, sleeps for a modelled step time
(network RTT + compute, both per expert) and answers with the top-k reply a real model produced at
that position of a recorded text. Hundreds fit in one process, each joined to the router through
the real RouterLink (registration and heartbeats), so the router's registry, selection, gather,
mixing and failure handling all run unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
from dataclasses import dataclass

import grpc
import numpy as np

import mesh_llm
from mesh_llm.expert.join import RouterLink
from mesh_llm.grpc_util import bind, new_server
from mesh_llm.pb import expert_pb2, expert_pb2_grpc
from mesh_llm.wire import encode_topk


@dataclass(frozen=True, kw_only=True)
class Recording:
    label: str  # which model variant produced it
    ids: list[np.ndarray]  # per position: top-k ids, most probable first
    logprobs: list[np.ndarray]  # per position: their log-probabilities
    rest: list[float]  # per position: log of the mass outside the top-k
    fingerprint: str  # tokenizer fingerprint of the model
    vocab_size: int  # rows of its distribution
    context_limit: int  # positions a session may hold
    tokenizer_files: dict[str, bytes]  # the tokenizer, for GetTokenizer
    step_ms: float  # measured decode step time of the real model on this machine

    def reply(self, position: int, top_k: int, cache: dict) -> expert_pb2.TopK:
        """The recorded reply at position (cyclic), cut to top_k, encoded once and cached."""
        key = (position % len(self.ids), top_k)
        msg = cache.get(key)
        if msg is None:
            p = key[0]
            k = min(top_k, len(self.ids[p]))
            lp = self.logprobs[p]
            rest = float(np.logaddexp.reduce(np.append(lp[k:], self.rest[p]))) if k < len(lp) else self.rest[p]
            msg = cache[key] = encode_topk(self.ids[p][:k], lp[:k], rest, expert_pb2.LOGPROB_F32)
        return msg


def record(loaded, text_ids: list[int], top_k: int, label: str, skip: int = 32) -> Recording:
    """Record a model's top-k replies over a text (through its StepEngine) and time its decode steps."""
    from mesh_llm.expert.engine import StepEngine

    engine = StepEngine(loaded)
    result = engine.step("record", 0, text_ids, min(top_k, engine.max_top_k), True)
    engine.close("record")
    dists = result.distributions[skip:]
    step_ms = 1000.0 / engine.measure_speed(prompt_tokens=16, decode_tokens=8)
    return Recording(label=label, ids=[d.ids for d in dists], logprobs=[d.logprobs for d in dists],
                     rest=[d.rest_logmass for d in dists], fingerprint=loaded.fingerprint,
                     vocab_size=loaded.vocab_size, context_limit=loaded.context_limit,
                     tokenizer_files=engine.tokenizer_files(), step_ms=step_ms)


@dataclass(frozen=True, kw_only=True)
class StepModel:
    rtt_ms: float  # network round trip of this expert
    compute_ms: float  # median decode step of this expert's hardware
    jitter: float = 0.15  # log-normal sigma of each step's compute time
    per_extra_token: float = 0.05  # extra compute per additional token in one step (prefill, catch-up)

    def sample_ms(self, rng: random.Random, tokens: int) -> float:
        """One step's time: RTT plus a log-normal compute time scaled by the tokens appended."""
        compute = self.compute_ms * math.exp(rng.gauss(0.0, self.jitter)) * (1 + self.per_extra_token * (tokens - 1))
        return self.rtt_ms + compute


class ReplayService(expert_pb2_grpc.ExpertServicer):
    """Expert servicer replaying a Recording with modelled step times."""

    def __init__(self, recording: Recording, model: StepModel, seed: int, offset: int = 0):
        self.recording = recording
        self.model = model
        self.rng = random.Random(seed)
        self.offset = offset  # shifts the replayed positions so experts of one recording are not identical
        self.sessions: dict[str, int] = {}
        self.steps = 0
        self.step_log: dict[int, float] = {}  # session length after a step -> modelled ms it slept
        self._cache: dict = {}

    def info(self) -> expert_pb2.ExpertInfo:
        """ExpertInfo of the replayed model (no EOS ids, so generations run to max_tokens)."""
        r = self.recording
        return expert_pb2.ExpertInfo(
            model_id=f"replay:{r.label}", tokenizer_fingerprint=r.fingerprint, vocab_size=r.vocab_size,
            context_limit=r.context_limit, device="simulated", quantization="none", dtype="float32",
            tokens_per_second=1000.0 / self.model.compute_ms, max_top_k=len(r.ids[0]), eos_token_ids=[],
            max_sessions=4096, expert_version=mesh_llm.__version__)

    async def Info(self, request, context):
        return self.info()

    async def Step(self, request, context):
        held = self.sessions.get(request.session_id)
        if held is None and request.start_position != 0:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown session; open it with start_position 0")
        if request.start_position > (held or 0):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "gap in the session")
        length = request.start_position + len(request.tokens)
        slept = self.model.sample_ms(self.rng, len(request.tokens))
        await asyncio.sleep(slept / 1000)
        self.step_log[length] = slept
        self.sessions[request.session_id] = length
        self.steps += 1
        msg = self.recording.reply(length - 1 + self.offset, request.top_k, self._cache)
        return expert_pb2.StepReply(distributions=[msg], session_length=length, compute_ms=self.model.compute_ms,
                                    encoding=expert_pb2.LOGPROB_F32)

    async def Rollback(self, request, context):
        self.sessions[request.session_id] = min(self.sessions.get(request.session_id, 0), request.length)
        return expert_pb2.RollbackReply(session_length=self.sessions[request.session_id])

    async def CloseSession(self, request, context):
        return expert_pb2.CloseSessionReply(existed=self.sessions.pop(request.session_id, None) is not None)

    async def GetTokenizer(self, request, context):
        for name, data in self.recording.tokenizer_files.items():
            yield expert_pb2.FileChunk(name=name, offset=0, data=data)


class ReplayExpert:
    """One replay expert: its gRPC server and its RouterLink task."""

    def __init__(self, service: ReplayService, name: str):
        self.service = service
        self.name = name
        self.server = None
        self.link: RouterLink | None = None
        self.task: asyncio.Task | None = None
        self.address = ""
        self.alive = False

    async def start(self, router: str, secret: str) -> None:
        """Serve on a loopback port and start joining the router."""
        self.server = new_server()
        expert_pb2_grpc.add_ExpertServicer_to_server(self.service, self.server)
        port = bind(self.server, "127.0.0.1", 0)
        await self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.link = RouterLink(router=router, secret=secret, advertise=self.address, name=self.name,
                               info=self.service.info, active_sessions=lambda: len(self.service.sessions))
        self.task = asyncio.create_task(self.link.run())
        self.alive = True

    async def kill(self) -> None:
        """Stop answering and stop heartbeating at once (a crashed donor)."""
        self.alive = False
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        if self.server is not None:
            await self.server.stop(0)
