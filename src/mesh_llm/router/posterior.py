"""Context-posterior routing: experts are chosen and weighted by how well they explain the recent context.

Each expert's mean log-likelihood of the recent context (the prompt, then a sliding window of
generated tokens) gives a posterior over experts, P(e | context) ∝ exp(mean log p_e / temperature)
(c-BTM's weighting with a likelihood in place of a cluster distance); the router mixes the top K
with their posterior renormalised over them and floored. `posterior-prompt` fixes the weights after
the prompt (PackLLM); `posterior` keeps sliding. The likelihoods come from the experts' own replies
(exact score_ids for tokens an expert appends, its top-k reply for tokens the router then chose), so
routing costs no extra round trip.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

POSTERIOR_POLICIES = ("posterior", "posterior-prompt")


@dataclass(frozen=True, kw_only=True)
class PosteriorConfig:
    temperature: float = 0.1  # nats/token; posterior ∝ exp(mean log-likelihood / temperature)
    floor: float = 0.05  # least mixing weight a selected expert keeps (before renormalising)
    window: int = 64  # most recent scored tokens per expert that count
    refresh_every: int = 16  # rounds between asking every candidate again, so unchosen experts are rescored
    prompt_only: bool = False  # weights fixed once the prompt is scored (PackLLM)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"posterior temperature must be > 0, got {self.temperature}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"posterior floor must be in [0, 1), got {self.floor}")
        if self.window < 1 or self.refresh_every < 1:
            raise ValueError("posterior window and refresh_every must be >= 1")


def posterior(mean_logprobs: Mapping[str, float], temperature: float) -> dict[str, float]:
    """Softmax of mean log-likelihoods over temperature: a normalised posterior over the experts given."""
    if not mean_logprobs:
        return {}
    top = max(mean_logprobs.values())
    raw = {e: math.exp((lp - top) / temperature) for e, lp in mean_logprobs.items()}
    total = sum(raw.values())
    return {e: v / total for e, v in raw.items()}


def mixing_weights(post: Mapping[str, float], chosen: Sequence[str], floor: float) -> list[float]:
    """Weights of the chosen experts: their posterior renormalised over them, floored, renormalised again."""
    mass = [post.get(e, 0.0) for e in chosen]
    total = sum(mass)
    shares = [m / total for m in mass] if total > 0 else [1.0 / len(chosen)] * len(chosen)
    floored = [max(s, floor) for s in shares]
    return [f / sum(floored) for f in floored]


class PosteriorTracker:
    """Per-generation log-likelihoods of context tokens under each expert, and the posterior they imply."""

    def __init__(self, config: PosteriorConfig) -> None:
        self.config = config
        self.scores: dict[str, dict[int, float]] = {}  # expert -> context position -> log p(token there)
        self.frozen = False  # set once the prompt is scored when prompt_only

    def record(self, expert_id: str, first_position: int, logprobs: Sequence[float]) -> None:
        """Log-probabilities of the context tokens at first_position, first_position + 1, ..."""
        if self.frozen:
            return
        table = self.scores.setdefault(expert_id, {})
        for offset, value in enumerate(logprobs):
            if math.isfinite(value):
                table[first_position + offset] = float(value)
        if len(table) > 2 * self.config.window:  # only the newest `window` count: keep the cost flat in length
            for position in heapq.nsmallest(len(table) - self.config.window, table):
                del table[position]

    def freeze_if_prompt_only(self) -> None:
        """End updates after the prompt round when weights are fixed by the prompt."""
        self.frozen = self.config.prompt_only

    def mean_logprobs(self) -> dict[str, float]:
        """Each scored expert's mean log-likelihood over its most recent `window` scored tokens."""
        means = {}
        for expert_id, table in self.scores.items():
            recent = heapq.nlargest(self.config.window, table)
            if recent:
                means[expert_id] = sum(table[p] for p in recent) / len(recent)
        return means

    def posterior(self) -> dict[str, float]:
        """P(expert | recent context) over the experts scored so far."""
        return posterior(self.mean_logprobs(), self.config.temperature)
