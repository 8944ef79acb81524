"""The step engine: append tokens to a session's KV cache and return sparse top-k log-probabilities."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mesh_llm.errors import StatusError
from mesh_llm.expert.batching import StepCall, batch_groups, pack_caches, unpack_cache
from mesh_llm.expert.sessions import Session, SessionLimits, SessionStore
from mesh_llm.grpc_util import DEFAULT_MAX_MESSAGE
from mesh_llm.models.loading import LoadedModel

log = logging.getLogger(__name__)
MAX_TOP_K_CAP = 4096
ROW_BLOCK = 256  # log-softmax rows computed at once (bounds the extra memory of long all-position steps)


class StepError(StatusError):
    """A step request that cannot be served."""


@dataclass(frozen=True, kw_only=True)
class TopKResult:
    ids: np.ndarray  # token ids, most probable first
    logprobs: np.ndarray  # their log-probabilities (float32 values widened to float64)
    rest_logmass: float  # log of the probability outside ids


@dataclass(frozen=True, kw_only=True)
class StepResult:
    distributions: list[TopKResult]  # one per requested position
    session_length: int  # tokens held after the step
    compute_ms: float  # time in the model
    scores: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))  # log-prob of each score id


class StepEngine:
    """Runs model steps on sessions, concurrent ones batched; call from one thread (the service uses one worker)."""

    def __init__(self, loaded: LoadedModel, limits: SessionLimits = SessionLimits()):
        self.loaded = loaded
        self.sessions = SessionStore(limits, loaded.kv_bytes_per_token)
        self.max_top_k = min(loaded.vocab_size, MAX_TOP_K_CAP)
        self.tokens_per_second = 0.0
        self.steps = 0
        self.tokens_processed = 0
        self.max_reply_bytes = DEFAULT_MAX_MESSAGE  # the gRPC message limit replies must fit
        self._tokenizer_files: dict[str, bytes] | None = None

    def step(self, session_id: str, start: int, tokens: list[int], top_k: int, all_positions: bool,
             score_ids: Sequence[int] = (), value_bytes: int = 4) -> StepResult:
        """Append tokens at position start (rolling back or opening the session); top-k distributions and scores.

        scores[j] is the full-vocabulary log-probability of score_ids[j] after appended token j, from the
        same forward pass; value_bytes (4 for float32, 2 for float16) sizes the reply for the message limit.
        """
        call = StepCall(session_id=session_id, start=start, tokens=tokens, top_k=top_k, all_positions=all_positions,
                        score_ids=score_ids, value_bytes=value_bytes)
        result = self.step_batch([call])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def step_batch(self, calls: Sequence[StepCall]) -> list[StepResult | Exception]:
        """Run steps of distinct sessions (those of similar length share one pass); a result or error each."""
        results: list[StepResult | Exception | None] = [None] * len(calls)
        sessions: dict[int, Session] = {}
        batch_ids = {call.session_id for call in calls}
        for i, call in enumerate(calls):
            try:
                sessions[i] = self._open(call, batch_ids)
            except StepError as exc:
                results[i] = exc
        ready = [i for i in range(len(calls)) if i in sessions]
        self.sessions.enforce(keep=batch_ids, extra_tokens=sum(len(calls[i].tokens) for i in ready))
        for group in batch_groups([calls[i] for i in ready]):
            members = [ready[j] for j in group]
            began = time.perf_counter()
            try:
                rows = self._forward([calls[i] for i in members], [sessions[i] for i in members])
            except Exception as exc:
                for i in members:
                    self.sessions.drop(calls[i].session_id)  # a cache may hold a half-written step
                    results[i] = exc
                continue
            elapsed = time.perf_counter() - began
            self._account(len(members), sum(len(calls[i].tokens) for i in members), elapsed)
            for i, (distributions, scores) in zip(members, rows):
                results[i] = StepResult(distributions=distributions, session_length=len(sessions[i].tokens),
                                        compute_ms=elapsed * 1000, scores=scores)
        return results

    def _open(self, call: StepCall, batch_ids: set[str]) -> Session:
        """The call's session, validated, opened or rolled back to call.start."""
        self._validate(call.session_id, call.start, call.tokens, call.top_k)
        self._validate_scoring(call.tokens, call.top_k, call.all_positions, call.score_ids, call.value_bytes)
        session = self.sessions.get(call.session_id)
        if session is None:
            if call.start != 0:
                raise StepError("NOT_FOUND", f"session {call.session_id!r} is unknown or was evicted; "
                                "open it again with start_position 0 and the full context")
            session = self.sessions.create(call.session_id, self._new_cache(), keep=batch_ids)
        held = len(session.tokens)
        if call.start > held:
            raise StepError("FAILED_PRECONDITION", f"session {call.session_id!r} holds {held} tokens, so "
                            f"start_position {call.start} would leave a gap; send the tokens from position {held}")
        if call.start < held:
            self._crop(session, call.start)
        return session

    def _forward(self, calls: list[StepCall], sessions: list[Session]) -> list[tuple[list[TopKResult], np.ndarray]]:
        """One model call for these steps (shorter ones right-padded); extends each session; rows read per call."""
        import torch

        model = self.loaded.model
        counts = [len(c.tokens) for c in calls]
        width = max(counts)
        uniform = min(counts) == width
        keep = 1 if uniform and not any(c.all_positions or c.score_ids for c in calls) else width
        with torch.inference_mode():
            ids = torch.tensor([c.tokens + [0] * (width - len(c.tokens)) for c in calls], dtype=torch.long,
                               device=self.loaded.device)
            if len(calls) == 1:
                logits = model(input_ids=ids, cache=sessions[0].cache, use_cache=True, logits_to_keep=keep).logits
            else:
                lengths = [len(s.tokens) for s in sessions]
                packed = pack_caches([s.cache for s in sessions], lengths, counts, model.config, self.loaded.device)
                logits = model(input_ids=ids, attention_mask=packed.attention_mask, position_ids=packed.position_ids,
                               cache=packed.cache, use_cache=True, logits_to_keep=keep).logits
                for row, session in enumerate(sessions):
                    session.cache = unpack_cache(packed, row, lengths[row] + counts[row], model.config)
            rows = []
            for row, (call, session, count) in enumerate(zip(calls, sessions, counts)):
                end = count - (width - keep)  # kept logits cover the last `keep` of the padded new positions
                own = logits[row, :end] if call.all_positions or call.score_ids else logits[row, end - 1:end]
                rows.append(self._read_rows(own, call.top_k, call.all_positions, call.score_ids))
                session.tokens.extend(call.tokens)
        return rows

    def rollback(self, session_id: str, length: int) -> int:
        """Shorten a session to length tokens; returns the new length."""
        session = self.sessions.get(session_id)
        if session is None:
            raise StepError("NOT_FOUND", f"session {session_id!r} is unknown or was evicted")
        if length > len(session.tokens):
            raise StepError("OUT_OF_RANGE", f"session {session_id!r} holds {len(session.tokens)} tokens; "
                            f"cannot roll back to a longer length {length}")
        self._crop(session, length)
        return len(session.tokens)

    def tokenizer_files(self) -> dict[str, bytes]:
        """The tokenizer saved as files (name to bytes), made once and kept."""
        if self._tokenizer_files is None:
            with tempfile.TemporaryDirectory() as tmp:
                self.loaded.tokenizer.save_pretrained(tmp)
                self._tokenizer_files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
        return self._tokenizer_files

    def close(self, session_id: str) -> bool:
        """Free a session's cache; True if it existed."""
        return self.sessions.drop(session_id)

    def measure_speed(self, prompt_tokens: int = 8, decode_tokens: int = 8) -> float:
        """Decode tokens/s of a short throwaway session (the speed reported in Info)."""
        sid = "__speed_probe__"
        rng = np.random.default_rng(0)
        vocab = self.loaded.vocab_size
        self.step(sid, 0, rng.integers(0, vocab, prompt_tokens).tolist(), 1, False)
        began = time.perf_counter()
        for i in range(decode_tokens):
            self.step(sid, prompt_tokens + i, [int(rng.integers(0, vocab))], 1, False)
        self.close(sid)
        self.tokens_per_second = decode_tokens / (time.perf_counter() - began)
        return self.tokens_per_second

    def _validate(self, session_id: str, start: int, tokens: list[int], top_k: int) -> None:
        if not session_id:
            raise StepError("INVALID_ARGUMENT", "session_id is empty; choose any unique string")
        if not tokens:
            raise StepError("INVALID_ARGUMENT", "tokens is empty; a step appends at least one token")
        if not 1 <= top_k <= self.max_top_k:
            raise StepError("INVALID_ARGUMENT", f"top_k {top_k} is out of range; use 1..{self.max_top_k}")
        vocab = self.loaded.vocab_size
        bad = next((t for t in tokens if t >= vocab), None)
        if bad is not None:
            raise StepError("INVALID_ARGUMENT", f"token id {bad} is outside the vocabulary (0..{vocab - 1}); "
                            "check that router and expert share a tokenizer")
        limit = self.loaded.context_limit
        if start + len(tokens) > limit:
            raise StepError("OUT_OF_RANGE", f"context of {start + len(tokens)} tokens exceeds this model's "
                            f"limit of {limit}; shorten the prompt or max_tokens")
        if not self.sessions.fits(start + len(tokens)):
            raise StepError("RESOURCE_EXHAUSTED", f"a session of {start + len(tokens)} tokens exceeds this "
                            "expert's KV-cache budget; raise --max-cache-mb or shorten the context")

    def _validate_scoring(self, tokens: list[int], top_k: int, all_positions: bool, score_ids: Sequence[int],
                          value_bytes: int) -> None:
        if len(score_ids) > len(tokens):
            raise StepError("INVALID_ARGUMENT", f"{len(score_ids)} score_ids for {len(tokens)} tokens; send at most "
                            "one per appended token (score_ids[j] is scored at the position after tokens[j])")
        vocab = self.loaded.vocab_size
        bad = next((t for t in score_ids if t >= vocab), None)
        if bad is not None:
            raise StepError("INVALID_ARGUMENT", f"score id {bad} is outside the vocabulary (0..{vocab - 1}); "
                            "send ids of this expert's tokenizer")
        positions = len(tokens) if all_positions else 1
        size = self.reply_bytes(positions, top_k, value_bytes, len(score_ids))
        if size > self.max_reply_bytes:
            per_step = max(1, (self.max_reply_bytes - 64) // max(1, self.reply_bytes(1, top_k, value_bytes, 1) - 64))
            raise StepError("RESOURCE_EXHAUSTED", f"the reply ({positions} distributions of top_k {top_k}, about "
                            f"{size:,} bytes) would exceed the gRPC message limit of {self.max_reply_bytes:,} bytes; "
                            f"send fewer tokens per step (at most {per_step} at this top_k) or a smaller top_k")

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.loaded.model.config)

    @staticmethod
    def _crop(session, length: int) -> None:
        removed = len(session.tokens) - length
        if length == 0:
            session.cache.reset()
        elif removed > 0:
            session.cache.crop(-removed)  # a negative count removes that many trailing positions
        del session.tokens[length:]

    def _read_rows(self, logits, top_k: int, all_positions: bool,
                   score_ids: Sequence[int]) -> tuple[list[TopKResult], np.ndarray]:
        """Top-k distributions (every row, or the last) and the score ids' log-probabilities, block by block."""
        import torch

        n = logits.shape[0]
        scored = len(score_ids)
        targets = torch.tensor(list(score_ids), dtype=torch.long, device=logits.device)
        scores = np.empty(scored, dtype=np.float32)
        distributions: list[TopKResult] = []
        for lo in range(0, n, ROW_BLOCK):
            hi = min(lo + ROW_BLOCK, n)
            rows = torch.log_softmax(logits[lo:hi].float(), dim=-1)
            if lo < scored:
                upto = min(hi, scored)
                picked = rows[torch.arange(upto - lo, device=rows.device), targets[lo:upto]]
                scores[lo:upto] = picked.cpu().numpy()
            if all_positions:
                distributions += self._topk(rows, top_k)
            elif hi == n:
                distributions += self._topk(rows[-1:], top_k)
        return distributions, scores

    @staticmethod
    def _topk(rows, top_k: int) -> list[TopKResult]:
        """Top-k of each log-softmax row with the log of the mass outside it."""
        import torch

        values, ids = torch.topk(rows, top_k, dim=-1)
        if top_k >= rows.shape[-1]:
            rest = [-math.inf] * rows.shape[0]
        else:
            outside = rows.clone()
            outside.scatter_(1, ids, -math.inf)
            rest = torch.logsumexp(outside, dim=-1).cpu().tolist()
        ids, values = ids.cpu().numpy(), values.cpu().double().numpy()
        return [TopKResult(ids=ids[i], logprobs=values[i], rest_logmass=rest[i]) for i in range(rows.shape[0])]

    def reply_bytes(self, positions: int, top_k: int, value_bytes: int, scores: int) -> int:
        """Upper estimate of a StepReply's size: per entry an id delta varint and a value, plus framing."""
        id_bytes = max(1, (max(self.loaded.vocab_size - 1, 1).bit_length() + 6) // 7)
        return positions * (top_k * (id_bytes + value_bytes) + 20) + scores * 4 + 64

    def _account(self, steps: int, tokens: int, elapsed: float) -> None:
        self.steps += steps
        self.tokens_processed += tokens
        if tokens == steps and elapsed > 0:  # decode steps: each session gained one token in elapsed
            rate = 1.0 / elapsed
            self.tokens_per_second = rate if self.tokens_per_second == 0 else 0.9 * self.tokens_per_second + 0.1 * rate
