"""Per-token choice of which experts to ask: pluggable policies over lightweight candidate records.

A policy returns up to n candidates (K, or K+s when over-selecting for stragglers), most
preferred first; fewer when fewer are eligible, and the caller reports the degradation. Experts
with weight 0 or trust 0 (quarantined by spot checks) are never selected. Every policy first orders the
candidates by expert_id, so a
run with the same seed and the same candidates picks the same experts whatever order they came in.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mesh_llm.errors import MeshError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Candidate:
    expert_id: str  # registry id of the expert
    rtt_ms: float  # smoothed Step round-trip time; NaN while unmeasured
    tokens_per_second: float  # measured decode capacity; 0 while unknown
    weight: float  # mixing weight set by the operator (0 = never selected)
    tokenizer_fingerprint: str  # experts are only mixed within one fingerprint
    trust: float = 1.0  # spot-check trust in 0..1 (router.trust); 0 = quarantined, never selected


@dataclass(frozen=True, kw_only=True)
class GateContext:
    position: int  # index of the token being generated within the completion
    recent_tokens: tuple[int, ...] = ()  # last token ids of the context, oldest first
    features: np.ndarray | None = None  # optional context embedding for a learned gate
    posterior: Mapping[str, float] | None = None  # P(expert | recent context) for posterior routing


class UnknownPolicy(MeshError, ValueError):
    """A selection policy name that is not registered."""


@runtime_checkable
class SelectionPolicy(Protocol):
    """Chooses up to n of the candidates for one token."""

    @property
    def name(self) -> str:
        """The name the policy is registered under."""
        ...

    def select(
        self, candidates: Sequence[Candidate], n: int, rng: np.random.Generator, context: GateContext | None = None
    ) -> list[Candidate]:
        """Up to n distinct candidates, most preferred first."""
        ...


@runtime_checkable
class LearnedGate(Protocol):
    """A learned gate: one score per candidate given the context (higher = more suited)."""

    def __call__(self, candidates: Sequence[Candidate], context: GateContext | None) -> np.ndarray:
        """Scores, one per candidate, in the candidates' order."""
        ...


def eligible(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates with a positive weight and trust, ordered by expert_id."""
    return sorted((c for c in candidates if c.weight > 0 and c.trust > 0), key=lambda c: c.expert_id)


@dataclass(frozen=True, kw_only=True)
class RandomPolicy:
    name: str = "random"  # registry name

    def select(self, candidates: Sequence[Candidate], n: int, rng: np.random.Generator,
               context: GateContext | None = None) -> list[Candidate]:
        """n candidates drawn uniformly without replacement (the phase-1 default)."""
        pool = eligible(candidates)
        picks = rng.permutation(len(pool))[:n]
        return [pool[i] for i in picks]


@dataclass(frozen=True, kw_only=True)
class CapacityPolicy:
    name: str = "capacity"  # registry name

    def select(self, candidates: Sequence[Candidate], n: int, rng: np.random.Generator,
               context: GateContext | None = None) -> list[Candidate]:
        """n candidates drawn without replacement with odds tokens/s × weight (unknown speed: the median)."""
        pool = eligible(candidates)
        if not pool:
            return []
        speed = np.array([c.tokens_per_second for c in pool], dtype=np.float64)
        known = np.isfinite(speed) & (speed > 0)
        speed[~known] = np.median(speed[known]) if known.any() else 1.0
        score = speed * np.array([c.weight for c in pool])
        # Efraimidis–Spirakis: the n largest u^(1/score) are a weighted draw without replacement.
        keys = np.log(rng.random(len(pool))) / score
        return [pool[i] for i in np.argsort(-keys, kind="stable")[:n]]


@dataclass(frozen=True, kw_only=True)
class LatencyPolicy:
    name: str = "latency"  # registry name
    max_rtt_ms: float = 80.0  # experts with a smoothed RTT above this are not selected

    def select(self, candidates: Sequence[Candidate], n: int, rng: np.random.Generator,
               context: GateContext | None = None) -> list[Candidate]:
        """The n lowest-RTT candidates within the bound; unmeasured ones first, ties broken at random."""
        pool = [c for c in eligible(candidates) if not c.rtt_ms > self.max_rtt_ms]
        rtt = np.array([c.rtt_ms if math.isfinite(c.rtt_ms) else -1.0 for c in pool], dtype=np.float64)
        order = np.lexsort((rng.random(len(pool)), rtt))
        return [pool[i] for i in order[:n]]


@dataclass(frozen=True, kw_only=True)
class GatedPolicy:
    gate: LearnedGate  # scores candidates given the context
    name: str = "gate"  # registry name

    def select(self, candidates: Sequence[Candidate], n: int, rng: np.random.Generator,
               context: GateContext | None = None) -> list[Candidate]:
        """The n candidates the gate scores highest, ties broken at random."""
        pool = eligible(candidates)
        scores = np.asarray(self.gate(pool, context), dtype=np.float64)
        if scores.shape != (len(pool),) or not np.all(np.isfinite(scores)):
            raise ValueError(f"gate returned {scores.shape} scores (finite required) for {len(pool)} candidates")
        order = np.lexsort((rng.random(len(pool)), -scores))
        return [pool[i] for i in order[:n]]


@dataclass(frozen=True, kw_only=True)
class PosteriorPolicy:
    name: str = "posterior"  # registry name (also registered as posterior-prompt)

    def select(self, candidates: Sequence[Candidate], n: int, rng: np.random.Generator,
               context: GateContext | None = None) -> list[Candidate]:
        """Experts not yet scored first (so they get scored), then by posterior given the context; ties at random."""
        pool = eligible(candidates)
        post = (context.posterior if context is not None else None) or {}
        score = np.array([post.get(c.expert_id, math.inf) for c in pool], dtype=np.float64)
        order = np.lexsort((rng.random(len(pool)), -score))
        return [pool[i] for i in order[:n]]


_POLICIES: dict[str, Callable[..., SelectionPolicy]] = {
    "random": RandomPolicy,
    "capacity": CapacityPolicy,
    "latency": LatencyPolicy,
    "posterior": PosteriorPolicy,
    "posterior-prompt": lambda: PosteriorPolicy(name="posterior-prompt"),
}


def register_policy(name: str, factory: Callable[..., SelectionPolicy]) -> None:
    """Make a policy factory available to get_policy under name (e.g. a learned gate)."""
    _POLICIES[name] = factory


def policy_names() -> list[str]:
    """Names get_policy accepts."""
    return sorted(_POLICIES)


def get_policy(name: str, **options: Any) -> SelectionPolicy:
    """The registered policy called name, built with options; UnknownPolicy lists the known names."""
    factory = _POLICIES.get(name)
    if factory is None:
        raise UnknownPolicy(f"unknown selection policy {name!r}; known: {', '.join(policy_names())}")
    return factory(**options)


def pick_family(candidates: Sequence[Candidate], fingerprint: str | None = None) -> list[Candidate]:
    """Candidates with the given tokenizer fingerprint, or of the largest family when None."""
    if fingerprint is None:
        counts = Counter(c.tokenizer_fingerprint for c in candidates)
        if not counts:
            return []
        # Largest family; among equals the smallest fingerprint, so the choice is deterministic.
        fingerprint = min(counts, key=lambda f: (-counts[f], f))
    return [c for c in candidates if c.tokenizer_fingerprint == fingerprint]
