"""Mesh-wide generation defaults that operators and governance actions change at run time."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mesh_llm.mixing.aggregation import check_rules
from mesh_llm.mixing.selection import get_policy
from mesh_llm.router.drafting import check_gamma, parse_draft
from mesh_llm.router.posterior import PosteriorConfig


@dataclass(kw_only=True)
class MeshSettings:
    default_k: int = 2  # experts mixed per token when a request says 0
    default_policy: str = "random"  # selection policy when a request names none
    default_mix: str = "linear"  # aggregation rule when a request names none
    default_fill: str = "spread"  # fill rule for ids missing from an expert's top-k
    default_top_k: int = 64  # entries asked of each expert when a request says 0
    default_extra: int = 1  # straggler over-selection s when a request leaves it unset (and sets no seed)
    step_deadline_s: float = 10.0  # longest wait for one token's replies (prefill gets 3x)
    default_max_tokens: int = 128  # completion length when a request says 0
    latency_bound_ms: float = 80.0  # latency policy skips experts slower than this
    default_draft: str = "none"  # drafter for multi-token rounds: none, ngram or model:NAME
    default_draft_max: int = 8  # most tokens drafted per round when a request says 0
    posterior_temperature: float = 0.1  # posterior routing: nats/token of likelihood per e-fold of weight
    posterior_floor: float = 0.05  # posterior routing: least mixing weight of a selected expert
    posterior_window: int = 64  # posterior routing: recent scored tokens that count
    family: str = ""  # tokenizer fingerprint mixed when a request names none; "" = the first family checked
    spot_check: float = 0.0  # share of rounds whose replies are compared with same-model referees (router.trust)

    def posterior_config(self, prompt_only: bool = False) -> PosteriorConfig:
        """Posterior-routing settings as a config (ValueError when out of range)."""
        return PosteriorConfig(temperature=self.posterior_temperature, floor=self.posterior_floor,
                               window=self.posterior_window, prompt_only=prompt_only)

    def validate(self) -> None:
        """Raise ValueError on settings no generation could use."""
        if self.default_k < 1:
            raise ValueError(f"default_k must be >= 1, got {self.default_k}")
        get_policy(self.default_policy)
        check_rules(self.default_mix, self.default_fill)
        if not 1 <= self.default_top_k <= 4096:
            raise ValueError(f"default_top_k must be in 1..4096, got {self.default_top_k}")
        self.posterior_config()
        parse_draft(self.default_draft)
        check_gamma(self.default_draft_max)
        if not self.step_deadline_s > 0 or self.step_deadline_s == float("inf"):
            raise ValueError(f"step_deadline_s must be a finite number > 0, got {self.step_deadline_s}")
        if not 0.0 <= self.spot_check <= 1.0:  # NaN fails this too
            raise ValueError(f"spot_check must be a fraction of rounds in 0..1, got {self.spot_check}")
        if self.default_extra < 0:
            raise ValueError(f"default_extra must be >= 0, got {self.default_extra}")
        if self.family and not re.fullmatch(r"[0-9a-f]{64}", self.family):
            raise ValueError(f"family must be a full tokenizer fingerprint (64 hex digits, as ListExperts and "
                             f"/v1/models show it), got {self.family!r}")
