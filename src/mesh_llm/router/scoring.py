"""Exact scoring through the mesh: the linear mixture's log-probability of every token of a given text.

Each mixed expert gets one Step per chunk of the text with `score_ids` (the next text tokens), so it
returns the exact full-vocabulary log-probability of each of them from the same forward pass; with
alternatives asked for, `all_positions` brings its top-k at every position too. The mixture is
linear, p_mix(t) = Σ w_i p_i(t), so the scored tokens are exact (nothing is filled from rest mass).
An alternative is exact when every expert listed it in its top-k (or it is the scored token);
otherwise its value is the lower bound Σ over the experts that listed it.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from mesh_llm.errors import StatusError
from mesh_llm.mixing.aggregation import normalise_weights
from mesh_llm.mixing.selection import GateContext, UnknownPolicy, get_policy, pick_family
from mesh_llm.pb import expert_pb2, router_pb2
from mesh_llm.router.pool import ExpertPool
from mesh_llm.router.registry import Registry
from mesh_llm.router.settings import MeshSettings
from mesh_llm.router.steps import Target
from mesh_llm.router.tokenizers import TokenizerCache
from mesh_llm.wire import MalformedDistribution, SparseDist, decode_topk

MAX_TOP_LOGPROBS = 20
DEFAULT_TOP_K = 64  # entries per position asked of each expert for alternatives (more: exact more often)
CHUNK_TOKENS = 256  # tokens per Step (the router's channel takes replies up to 4 MiB)
REPLY_BUDGET = 3 << 20  # bytes of distributions one chunk's reply may carry
_REOPEN = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION)


class ScoringError(StatusError):
    """A scoring request that cannot be served; `code` names the gRPC status."""


class ExpertFailed(ScoringError):
    """One of the mixed experts failed or answered nonsense while scoring."""

    def __init__(self, expert_id: str, message: str):
        """UNAVAILABLE, naming the expert."""
        super().__init__("UNAVAILABLE", message)
        self.expert_id = expert_id


def default_top_k(top_logprobs: int) -> int:
    """Entries asked of each expert per position for top_logprobs alternatives (0: no distributions)."""
    return max(DEFAULT_TOP_K, 4 * top_logprobs) if top_logprobs else 0


@dataclass(frozen=True, kw_only=True)
class Alternative:
    token_id: int  # a candidate next token
    logprob: float  # log p_mix of it (a lower bound unless exact)
    exact: bool  # every mixed expert reported it


@dataclass(frozen=True, kw_only=True)
class ExpertScores:
    expert_id: str  # who scored
    logprobs: np.ndarray  # (n-1,) exact log p_i(tokens[j+1] | tokens[:j+1])
    dists: tuple[SparseDist, ...]  # (n-1,) its top-k after each token but the last; empty without alternatives
    reply_bytes: int  # serialised size of its Step replies
    compute_ms: float  # model time it reported


@dataclass(frozen=True, kw_only=True)
class MixtureScores:
    logprobs: np.ndarray  # (n-1,) exact log p_mix(tokens[j+1] | tokens[:j+1])
    experts: tuple[ExpertScores, ...]  # each expert's own scores, in the order given
    weights: np.ndarray  # normalised mixing weights, in the same order
    alternatives: tuple[tuple[Alternative, ...], ...]  # (n-1,) the mixture's most likely tokens per position


async def score_tokens(targets: Sequence[Target], weights: Sequence[float] | None, tokens: Sequence[int], *,
                       top_logprobs: int = 0, top_k: int = 0, timeout: float = 60.0,
                       chunk_tokens: int = CHUNK_TOKENS) -> MixtureScores:
    """Exact linear-mixture log-probabilities of tokens[1:] (and top alternatives) from one Step per expert and chunk.

    Experts are asked in parallel, the text in chunks of chunk_tokens; their sessions are closed at the
    end. Raises ExpertFailed (UNAVAILABLE) naming the expert when one fails: a mixture missing an
    expert would not be the one asked for.
    """
    if not targets:
        raise ScoringError("INVALID_ARGUMENT", "no experts to score with")
    try:
        w = normalise_weights(weights, len(targets))
    except ValueError as exc:
        raise ScoringError("INVALID_ARGUMENT", f"weights: {exc}") from None
    targets, w = [t for t, x in zip(targets, w) if x > 0], w[w > 0]  # a weight of 0 takes no part
    ask = max(top_k or default_top_k(top_logprobs), top_logprobs) if top_logprobs else 0
    session_id = f"score-{uuid.uuid4().hex}"
    tasks = [asyncio.ensure_future(_score_one(t, session_id, tokens, ask, timeout, chunk_tokens)) for t in targets]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:  # one failed: the others stop before their sessions are closed
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _close(targets, session_id)
    log_w = np.log(w)
    table = np.stack([r.logprobs for r in results])
    mixed = np.logaddexp.reduce(table + log_w[:, None], axis=0)
    alternatives = tuple(_alternatives([r.dists[j] for r in results], log_w, int(tokens[j + 1]), table[:, j],
                                       top_logprobs) for j in range(len(tokens) - 1)) if top_logprobs else ()
    return MixtureScores(logprobs=mixed, experts=tuple(results), weights=w, alternatives=alternatives)


async def _score_one(target: Target, session_id: str, tokens: Sequence[int], top_k: int, timeout: float,
                     chunk_tokens: int) -> ExpertScores:
    """One expert's exact scores (and top-k per position when top_k > 0), the text sent chunk by chunk."""
    chunk = max(1, min(chunk_tokens, REPLY_BUDGET // (top_k * 8 + 32) if top_k else chunk_tokens))
    logprobs: list[float] = []
    dists: list[SparseDist] = []
    size = 0
    compute = 0.0
    for start in range(0, len(tokens), chunk):
        end = min(start + chunk, len(tokens))
        reply = await _step_chunk(target, session_id, tokens, start, end, top_k, timeout)
        size += reply.ByteSize()
        compute += reply.compute_ms
        scored = len(tokens[start + 1:end + 1])
        try:
            logprobs += _checked_scores(reply, scored, end)
            if top_k:
                if len(reply.distributions) != end - start:
                    raise MalformedDistribution(f"{len(reply.distributions)} distributions for {end - start} tokens")
                dists += [decode_topk(d, reply.encoding, target.vocab_size) for d in reply.distributions[:scored]]
        except MalformedDistribution as exc:
            raise ExpertFailed(target.expert_id, f"expert {target.expert_id} sent an impossible scoring reply "
                               f"({exc}); exclude it with expert_ids or retry") from None
    return ExpertScores(expert_id=target.expert_id, logprobs=np.asarray(logprobs, dtype=np.float64),
                        dists=tuple(dists), reply_bytes=size, compute_ms=compute)


async def _step_chunk(target: Target, session_id: str, tokens: Sequence[int], start: int, end: int, top_k: int,
                      timeout: float) -> expert_pb2.StepReply:
    """Step tokens[start:end] scoring the tokens after each; re-open an evicted session once with the prefix."""
    request = expert_pb2.StepRequest(session_id=session_id, start_position=start, tokens=list(tokens[start:end]),
                                     top_k=max(top_k, 1), all_positions=top_k > 0, encoding=expert_pb2.LOGPROB_F32,
                                     score_ids=list(tokens[start + 1:end + 1]))
    try:
        try:
            return await target.stub.Step(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in _REOPEN or start == 0:
                raise
            await target.stub.Step(expert_pb2.StepRequest(session_id=session_id, start_position=0,
                                                          tokens=list(tokens[:start]), top_k=1), timeout=timeout)
            return await target.stub.Step(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise ExpertFailed(target.expert_id, f"expert {target.expert_id} failed while scoring tokens "
                           f"{start}..{end - 1}: {exc.code().name}: {exc.details()}") from None


def _checked_scores(reply: expert_pb2.StepReply, expected: int, length: int) -> list[float]:
    """The reply's score_logprobs after checking their count, range and the session length."""
    scores = list(reply.score_logprobs)
    if len(scores) != expected:
        raise MalformedDistribution(f"{len(scores)} scores for {expected} score ids")
    if reply.session_length != length:
        raise MalformedDistribution(f"session holds {reply.session_length} tokens, expected {length}")
    if any(math.isnan(s) or s > 1e-5 for s in scores):
        raise MalformedDistribution("a score is NaN, +inf or above 0")
    return [min(s, 0.0) for s in scores]


def _alternatives(dists: Sequence[SparseDist], log_w: np.ndarray, target: int, target_lps: np.ndarray,
                  n: int) -> tuple[Alternative, ...]:
    """The n most likely mixture tokens at one position from the experts' top-k (and the exact target)."""
    ids = np.union1d(np.concatenate([d.ids for d in dists]), [target])
    table = np.full((len(dists), len(ids)), -np.inf)
    known = np.zeros(table.shape, dtype=bool)
    for i, d in enumerate(dists):
        cols = np.searchsorted(ids, d.ids)
        table[i, cols], known[i, cols] = d.logprobs, True
    col = int(np.searchsorted(ids, target))
    table[:, col], known[:, col] = target_lps, True
    values = np.logaddexp.reduce(table + log_w[:, None], axis=0)
    exact = known.all(axis=0)
    order = np.lexsort((ids, -values))[:n]
    return tuple(Alternative(token_id=int(ids[c]), logprob=float(values[c]), exact=bool(exact[c])) for c in order)


async def _close(targets: Sequence[Target], session_id: str) -> None:
    """Free the scoring sessions (best effort: an unreachable expert drops them when idle)."""
    request = expert_pb2.CloseSessionRequest(session_id=session_id)
    await asyncio.gather(*(t.stub.CloseSession(request, timeout=5) for t in targets), return_exceptions=True)


# ---- the Score RPC: choose experts, tokenize, score, describe every token ----


@dataclass(frozen=True, kw_only=True)
class _Choice:
    targets: list[Target]  # experts to mix, in expert_id order
    weights: list[float]  # their mixing weights (the request's, else the registry's)
    fingerprint: str  # their tokenizer family
    vocab_size: int  # smallest vocabulary among them (ids must fit all)
    context_limit: int  # smallest context limit among them


async def score_request(request: router_pb2.ScoreRequest, *, registry: Registry, pool: ExpertPool,
                        tokenizers: TokenizerCache, settings: MeshSettings) -> router_pb2.ScoreReply:
    """Serve one Score call; ScoringError with a gRPC status name on requests that cannot be served."""
    began = time.perf_counter()
    if bool(request.prompt) == bool(request.token_ids):
        raise ScoringError("INVALID_ARGUMENT", "send either prompt (text) or token_ids, exactly one of them")
    if request.top_logprobs > MAX_TOP_LOGPROBS:
        raise ScoringError("INVALID_ARGUMENT",
                           f"top_logprobs {request.top_logprobs} is too many; use 0..{MAX_TOP_LOGPROBS}")
    choice = _choose(request, registry, pool, settings)
    tokenizer = await _tokenizer(choice, tokenizers)
    tokens, text, offsets = await asyncio.to_thread(_tokenize, tokenizer, request)
    _check_tokens(tokens, choice)
    top_k = request.top_k or default_top_k(request.top_logprobs)
    max_top_k = min(registry.get(t.expert_id).max_top_k for t in choice.targets)
    if top_k > max_top_k or top_k < request.top_logprobs:
        raise ScoringError("INVALID_ARGUMENT", f"top_k {top_k} is out of range; use {request.top_logprobs or 1}.."
                           f"{max_top_k} (at least top_logprobs, at most what these experts serve)")
    try:
        scores = await score_tokens(choice.targets, choice.weights, tokens, top_logprobs=request.top_logprobs,
                                    top_k=top_k, timeout=settings.step_deadline_s * 3)
    except ExpertFailed as exc:
        registry.record_failure(exc.expert_id, f"score: {exc}")
        raise
    reply = _reply(tokenizer, tokens, text, offsets, scores, choice.fingerprint)
    reply.seconds = time.perf_counter() - began
    return reply


def _choose(request: router_pb2.ScoreRequest, registry: Registry, pool: ExpertPool,
            settings: MeshSettings) -> _Choice:
    """The experts (and weights) a Score request mixes: all named ones, else k picked by the selection policy."""
    named = list(dict.fromkeys(request.expert_ids))
    unknown = set(named) - {r.expert_id for r in registry.experts()}
    if unknown:
        raise ScoringError("NOT_FOUND", f"unknown expert id(s) {', '.join(sorted(unknown))}; see `mesh status`")
    if request.weights and (len(request.weights) != len(request.expert_ids) or request.k not in (0, len(named))):
        raise ScoringError("INVALID_ARGUMENT", f"{len(request.weights)} weights for {len(request.expert_ids)} "
                           "expert_ids; send one weight per expert_ids entry and k 0 (all of them are mixed)")
    if named and request.k in (0, len(named)):
        records = [registry.get(e) for e in sorted(named)]
        down = [f"{r.expert_id} ({r.state})" for r in records if r.state not in ("online", "suspect")]
        if down:
            raise ScoringError("UNAVAILABLE", f"expert(s) {', '.join(down)} not serving; see `mesh status`")
        if len({r.tokenizer_fingerprint for r in records}) > 1:
            raise ScoringError("INVALID_ARGUMENT", "expert_ids name experts of different tokenizer families; "
                               "only one family can be mixed")
    else:
        records = [registry.get(e) for e in _select(request, named, registry, settings)]
    by_id = dict(zip(request.expert_ids, request.weights)) if request.weights else None
    return _Choice(targets=[Target(expert_id=r.expert_id, stub=pool.stub(r.address), vocab_size=r.vocab_size)
                            for r in records],
                   weights=[by_id[r.expert_id] for r in records] if by_id else [r.weight for r in records],
                   fingerprint=records[0].tokenizer_fingerprint, vocab_size=min(r.vocab_size for r in records),
                   context_limit=min(r.context_limit for r in records))


def _select(request: router_pb2.ScoreRequest, named: list[str], registry: Registry,
            settings: MeshSettings) -> list[str]:
    """k online experts of one family (among the named ones, if any) chosen by the selection policy, sorted."""
    candidates = [c for c in registry.candidates() if not named or c.expert_id in named]
    if not candidates:
        raise ScoringError("UNAVAILABLE", "no experts online; start one with `mesh-expert serve --join <token>`")
    family = pick_family(candidates, request.model_family or None)
    if not family:
        raise ScoringError("NOT_FOUND", f"no online expert has tokenizer family {request.model_family}")
    k = request.k or min(settings.default_k, len(family))
    if k > len(family):
        raise ScoringError("INVALID_ARGUMENT", f"k={k} but only {len(family)} expert(s) of this family are "
                           f"online; use k {len(family)} or fewer")
    name = request.policy or settings.default_policy
    try:
        policy = get_policy(name, **({"max_rtt_ms": settings.latency_bound_ms} if name == "latency" else {}))
    except UnknownPolicy as exc:
        raise ScoringError("INVALID_ARGUMENT", str(exc)) from None
    rng = np.random.default_rng(request.seed if request.HasField("seed") else None)
    chosen = sorted(c.expert_id for c in policy.select(family, k, rng, GateContext(position=0)))
    if len(chosen) < k:
        raise ScoringError("UNAVAILABLE", f"the {policy.name} policy found only {len(chosen)} of k={k} experts")
    return chosen


async def _tokenizer(choice: _Choice, tokenizers: TokenizerCache):
    """The family's tokenizer, cached or fetched from the first chosen expert that hands it over."""
    failures = []
    for target in choice.targets:
        try:
            return await tokenizers.get(choice.fingerprint, target.stub)
        except Exception as exc:  # an unreachable expert: try the next one
            failures.append(f"{target.expert_id}: {type(exc).__name__}")
    raise ScoringError("UNAVAILABLE", f"could not get the tokenizer from any chosen expert ({'; '.join(failures)})")


def _tokenize(tokenizer, request: router_pb2.ScoreRequest) -> tuple[list[int], str, list[int]]:
    """(token ids, text, character offset of each token in text) for a prompt or for token ids."""
    if request.prompt:
        if getattr(tokenizer, "is_fast", False):
            enc = tokenizer(request.prompt, return_offsets_mapping=True)
            return list(enc.input_ids), request.prompt, [int(a) for a, _ in enc.offset_mapping]
        ids = list(tokenizer(request.prompt).input_ids)
    else:
        ids = list(request.token_ids)
    prefixes = tokenizer.batch_decode([ids[:i] for i in range(len(ids) + 1)], skip_special_tokens=False)
    return ids, prefixes[-1] if request.token_ids else request.prompt, [len(p) for p in prefixes[:-1]]


def _check_tokens(tokens: Sequence[int], choice: _Choice) -> None:
    if not tokens:
        raise ScoringError("INVALID_ARGUMENT", "nothing to score: the prompt has no tokens")
    bad = next((t for t in tokens if t >= choice.vocab_size), None)
    if bad is not None:
        raise ScoringError("INVALID_ARGUMENT", f"token id {bad} is outside the vocabulary (0..{choice.vocab_size - 1}) "
                           "of these experts; tokenize with their tokenizer (see /v1/models for the family)")
    if len(tokens) > choice.context_limit:
        raise ScoringError("INVALID_ARGUMENT", f"{len(tokens)} tokens exceed the experts' context limit of "
                           f"{choice.context_limit}; score a shorter text")


def _reply(tokenizer, tokens: Sequence[int], text: str, offsets: Sequence[int], scores: MixtureScores,
           fingerprint: str) -> router_pb2.ScoreReply:
    """The ScoreReply: every token with its text, offset, exact logprob and alternatives; each expert's scores."""
    pieces: dict[int, str] = {}

    def piece(token_id: int) -> str:
        if token_id not in pieces:
            pieces[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
        return pieces[token_id]

    reply = router_pb2.ScoreReply(text=text, model_family=fingerprint)
    for j, token_id in enumerate(tokens):
        scored = router_pb2.ScoredToken(token_id=int(token_id), text=piece(int(token_id)), text_offset=offsets[j])
        if j:
            scored.logprob = float(scores.logprobs[j - 1])
            if scores.alternatives:
                scored.alternatives.extend(router_pb2.ScoreAlternative(
                    token_id=a.token_id, text=piece(a.token_id), logprob=a.logprob, exact=a.exact)
                    for a in scores.alternatives[j - 1])
        reply.tokens.append(scored)
    for e, w in zip(scores.experts, scores.weights):
        reply.experts.append(router_pb2.ExpertScore(expert_id=e.expert_id, weight=float(w),
                                                    logprobs=e.logprobs.tolist(),
                                                    reply_bytes=e.reply_bytes, compute_ms=e.compute_ms))
    return reply

