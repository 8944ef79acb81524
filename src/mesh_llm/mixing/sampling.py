"""Choosing the next token from a mixed SparseDist, and deciding when a generation stops.

Only the listed ids are candidates: the rest mass (the probability the mixture puts on tokens
outside the union of the experts' top-k) is never sampled, because nothing says which token it
belongs to. Temperature, top-k and top-p therefore act on the listed ids alone, with the
probabilities renormalised over them; the returned log-probability is the token's value under
the mix itself (before temperature), as reported in TokenEvent.logprob.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from mesh_llm.wire import SparseDist

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy (argmax; ties go to the lowest id)
    top_p: float = 1.0  # nucleus: keep the fewest top tokens whose mass reaches top_p; 0 or 1 = off
    top_k: int = 0  # keep only the top_k most likely tokens; 0 = off

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass(frozen=True, kw_only=True)
class Choice:
    token_id: int  # the chosen token
    logprob: float  # its log-probability under the mix (not the tempered one)


class Sampler:
    """Samples tokens from SparseDists with one config and one seeded random generator."""

    def __init__(self, config: SamplingConfig, seed: int | None = None) -> None:
        self.config = config
        self.rng = np.random.default_rng(seed)

    def sample(self, dist: SparseDist) -> Choice:
        """Pick one listed id of dist under the config; the rest mass is never chosen."""
        index = choose_index(dist.logprobs, self.config, self.rng)
        return Choice(token_id=int(dist.ids[index]), logprob=float(dist.logprobs[index]))

    def verify(self, dist: SparseDist, draft_id: int, draft_probs: np.ndarray | None) -> tuple[bool, Choice]:
        """Accept a drafted token or replace it, so the output follows this sampler's distribution over dist.

        Greedy: accepted when the draft is the argmax, else the argmax. Sampling: accepted with
        probability min(1, p/q), else a token drawn from the residual max(0, p - q) (speculative
        sampling); draft_probs is the drafter's full-vocabulary distribution q, None for a
        deterministic draft (q puts all its mass on draft_id).
        """
        if self.config.temperature == 0 or len(dist.logprobs) == 1:
            choice = self.sample(dist)
            return choice.token_id == draft_id, choice
        pool, probs = sampling_probs(dist.logprobs, self.config)
        probs = probs / probs.sum()
        ids = dist.ids[pool]
        hit = np.flatnonzero(ids == draft_id)
        p = float(probs[hit[0]]) if len(hit) else 0.0
        if draft_probs is None:
            q_pool = (ids == draft_id).astype(np.float64)
        else:
            q_pool = np.asarray(draft_probs, dtype=np.float64)[ids]
        q = 1.0 if draft_probs is None else float(draft_probs[draft_id])
        if p > 0 and self.rng.random() * q < p:
            index = pool[hit[0]]
            return True, Choice(token_id=int(dist.ids[index]), logprob=float(dist.logprobs[index]))
        residual = np.maximum(probs - q_pool, 0.0)
        if residual.sum() <= 0:
            residual = probs  # p <= q everywhere only when p == q: nothing to correct
        cumulative = np.cumsum(residual)
        pick = min(int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right")), len(pool) - 1)
        index = pool[pick]
        return False, Choice(token_id=int(dist.ids[index]), logprob=float(dist.logprobs[index]))


def sampling_probs(logprobs: np.ndarray, config: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
    """Indices into logprobs that sampling may pick, with unnormalised probabilities after temperature, top-k, top-p."""
    if config.temperature == 0 or len(logprobs) == 1:
        return np.array([int(np.argmax(logprobs))]), np.ones(1)
    scaled = logprobs / config.temperature
    n = len(scaled)
    limit = config.top_k if 0 < config.top_k < n else n
    pool = np.argpartition(-scaled, limit - 1)[:limit] if limit < n else np.arange(n)
    values = scaled[pool]
    probs = np.exp(values - values.max())
    if 0 < config.top_p < 1:
        pool, probs = _nucleus(pool, values, probs, config.top_p)
    return pool, probs


def choose_index(logprobs: np.ndarray, config: SamplingConfig, rng: np.random.Generator) -> int:
    """Index into logprobs chosen by greedy, temperature, top-k and top-p sampling (in that order)."""
    if config.temperature == 0 or len(logprobs) == 1:
        return int(np.argmax(logprobs))
    pool, probs = sampling_probs(logprobs, config)
    cumulative = np.cumsum(probs)
    pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(pool[min(pick, len(pool) - 1)])


def _nucleus(pool: np.ndarray, values: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The fewest most likely entries of pool whose mass reaches top_p (ties: lower index first).

    Sorts only as many of the best entries as needed (64, then 4x more), not the whole pool.
    """
    goal = top_p * float(probs.sum())
    m = min(64, len(pool))
    while True:
        best = np.argpartition(-values, m - 1)[:m] if m < len(pool) else np.arange(len(pool))
        best = best[np.lexsort((pool[best], -values[best]))]
        cumulative = np.cumsum(probs[best])
        if cumulative[-1] >= goal or m == len(pool):
            break
        m = min(4 * m, len(pool))
    keep = min(int(np.searchsorted(cumulative, goal)) + 1, m)
    return pool[best[:keep]], probs[best[:keep]]


class StopChecker:
    """Tracks a generation's text and says when it ends: EOS id, stop string or max tokens."""

    def __init__(self, *, stop: Sequence[str] = (), max_tokens: int = 128, eos_ids: Iterable[int] = ()) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.stop = tuple(s for s in stop if s)
        self.max_tokens = max_tokens
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.n_tokens = 0
        self.text = ""
        self.finish_reason: str | None = None

    def update(self, token_id: int, text: str) -> str | None:
        """Take the next token and the full decoded completion so far; return a finish reason or None.

        Reasons are "eos" (text stays as before the EOS token), "stop" (text cut before the
        earliest stop string) and "length" (max_tokens reached).
        """
        if self.finish_reason is not None:
            raise RuntimeError(f"generation already finished ({self.finish_reason})")
        self.n_tokens += 1
        if token_id in self.eos_ids:
            self.finish_reason = "eos"
            return self.finish_reason
        cut = self._find_stop(text)
        if cut is not None:
            self.text = text[:cut]
            self.finish_reason = "stop"
            return self.finish_reason
        self.text = text
        if self.n_tokens >= self.max_tokens:
            self.finish_reason = "length"
        return self.finish_reason

    def _find_stop(self, text: str) -> int | None:
        # text that only grew since the last call is searched from where a stop string could first end anew
        start = len(self.text) if text.startswith(self.text) else 0
        hits = [i for i in (text.find(s, max(start - len(s) + 1, 0)) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def streamable(self) -> str:
        """The text safe to show now: without a tail that could still grow into a stop string."""
        if self.finish_reason is not None or not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return self.text[: len(self.text) - hold]
