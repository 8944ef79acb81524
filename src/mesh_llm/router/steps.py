"""One token's fan-out: ask K+s experts in parallel, keep the first K good replies within a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from mesh_llm.errors import MeshError
from mesh_llm.pb import expert_pb2, expert_pb2_grpc
from mesh_llm.wire import MalformedDistribution, SparseDist, decode_topk

log = logging.getLogger(__name__)
_REOPEN = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


class Halted(MeshError):
    """The mesh was halted while a token was being gathered."""


@dataclass(frozen=True, kw_only=True)
class Target:
    expert_id: str  # registry id
    stub: expert_pb2_grpc.ExpertStub  # on an open channel
    vocab_size: int  # the expert's output rows, for validating its replies


@dataclass(frozen=True, kw_only=True)
class CallResult:
    expert_id: str  # who was asked
    outcome: str  # ok, late, error:<grpc code>, rejected:<why>
    latency_ms: float  # time from sending to the reply (or to giving up)
    reply_bytes: int  # serialised size of the reply
    dist: SparseDist | None  # the validated distribution after the last token sent, when outcome is ok
    session_length: int  # tokens the expert's session holds after the call (0 when unknown)
    reopened: bool = False  # the session had to be re-opened with the full context
    compute_ms: float = 0.0  # time the expert reported spending in its model
    dists: tuple[SparseDist, ...] = ()  # with positions > 1: the distributions at the last `positions` tokens
    scores: tuple[float, ...] = ()  # exact log-probabilities of context tokens score_from, score_from + 1, ...
    score_from: int = 0  # context position of the first entry of scores

    @property
    def ok(self) -> bool:
        """Whether the reply can go into the mix."""
        return self.dist is not None

    def at(self, position: int) -> SparseDist:
        """The distribution after the position-th of the last positions asked for (0-based)."""
        return self.dists[position] if self.dists else self.dist


async def call_expert(target: Target, *, session_id: str, context: Sequence[int], held: int, top_k: int,
                      timeout: float, positions: int = 1, score_upto: int = 0) -> CallResult:
    """Send an expert the tokens it has not seen and validate its top-k reply(ies); never raises on expert faults.

    With positions > 1 (draft verification) the distributions after each of the last `positions`
    tokens of context come back, in order, as CallResult.dists. With score_upto, the exact log-probabilities
    of the context tokens the expert appends (after the first) up to position score_upto come back as scores.
    """
    began = time.perf_counter()
    reopened = False
    start = held
    try:
        try:
            reply = await _step(target, session_id, context, start, top_k, timeout, all_positions=positions > 1,
                                score_upto=score_upto)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _REOPEN or held == 0:
                raise
            reopened, start = True, 0  # evicted or diverged: send the whole context again
            remaining = timeout - (time.perf_counter() - began)
            reply = await _step(target, session_id, context, 0, top_k, max(remaining, 0.01),
                                all_positions=positions > 1, score_upto=score_upto)
    except grpc.aio.AioRpcError as exc:
        return CallResult(expert_id=target.expert_id, outcome=f"error:{exc.code().name}",
                          latency_ms=_ms(began), reply_bytes=0, dist=None, session_length=0, reopened=reopened)
    size = reply.ByteSize()
    try:
        expected = len(context) - start if positions > 1 else 1
        if len(reply.distributions) != expected or expected < positions:
            raise MalformedDistribution(f"{len(reply.distributions)} distributions, expected {expected}")
        if reply.session_length != len(context):
            raise MalformedDistribution(f"session holds {reply.session_length} tokens, expected {len(context)}")
        dists = tuple(decode_topk(d, reply.encoding, target.vocab_size)
                      for d in reply.distributions[len(reply.distributions) - positions:])
        scores = tuple(reply.score_logprobs)
        if len(scores) != len(_score_ids(context, start, score_upto)) or not all(v <= 1e-4 for v in scores):
            raise MalformedDistribution(f"{len(scores)} score log-probabilities, expected "
                                        f"{len(_score_ids(context, start, score_upto))}, each <= 0")
    except MalformedDistribution as exc:
        return CallResult(expert_id=target.expert_id, outcome=f"rejected:{exc}", latency_ms=_ms(began),
                          reply_bytes=size, dist=None, session_length=0, reopened=reopened)
    return CallResult(expert_id=target.expert_id, outcome="ok", latency_ms=_ms(began), reply_bytes=size,
                      dist=dists[-1], session_length=reply.session_length, reopened=reopened,
                      compute_ms=reply.compute_ms, dists=dists if positions > 1 else (), scores=scores,
                      score_from=start + 1)


def _score_ids(context: Sequence[int], start: int, score_upto: int) -> list[int]:
    """Next tokens of the appended ones (score_ids[j] follows context[start + j]), within context[:score_upto]."""
    return list(context[start + 1: score_upto])


async def _step(target: Target, session_id: str, context: Sequence[int], start: int, top_k: int, timeout: float,
                all_positions: bool = False, score_upto: int = 0):
    request = expert_pb2.StepRequest(session_id=session_id, start_position=start, tokens=list(context[start:]),
                                     top_k=top_k, all_positions=all_positions,
                                     score_ids=_score_ids(context, start, score_upto))
    return await target.stub.Step(request, timeout=timeout)


def _ms(began: float) -> float:
    return (time.perf_counter() - began) * 1000


async def gather_replies(ranked: Sequence, *, k: int, extra: int, deadline_s: float,
                         halt: asyncio.Event | None, call) -> list[CallResult]:
    """Launch the first k+extra of ranked, replace failures from the rest, stop at k good replies or the deadline.

    Items of ranked need an `expert_id`; `call(item, timeout)` performs one expert call.
    Returns every launched call's result (late
    ones as outcome "late"). Raises Halted if `halt` is set meanwhile.
    """
    end = time.perf_counter() + deadline_s
    queue = list(ranked)
    pending: dict[asyncio.Task, object] = {}
    started: dict[str, float] = {}
    results: list[CallResult] = []
    good = 0

    def launch(n: int) -> None:
        for _ in range(min(n, len(queue))):
            target = queue.pop(0)
            started[target.expert_id] = time.perf_counter()
            pending[asyncio.create_task(call(target, max(end - time.perf_counter(), 0.01)))] = target

    launch(k + extra)
    halt_wait = asyncio.create_task(halt.wait()) if halt is not None else None
    try:
        while good < k and pending:
            remaining = end - time.perf_counter()
            if remaining <= 0:
                break
            waiting = set(pending) | ({halt_wait} if halt_wait else set())
            done, _ = await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if halt_wait is not None and halt_wait in done:
                raise Halted("mesh halted")
            for task in done:
                pending.pop(task)
                result = task.result()
                results.append(result)
                if result.ok:
                    good += 1
                elif good + len(pending) < k + extra:
                    launch(1)  # replace a failed expert with the next in rank
    finally:
        if halt_wait is not None:
            halt_wait.cancel()
        for task, target in pending.items():
            task.cancel()
            results.append(CallResult(expert_id=target.expert_id, outcome="late",
                                      latency_ms=_ms(started[target.expert_id]), reply_bytes=0, dist=None,
                                      session_length=0))
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    return results
