"""Proposal schema and tier classification from the action kind and its declared parameter bounds."""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

ParamValue = bool | int | float | str


class Tier(str, enum.Enum):
    """Action tiers, from least to most restrictive."""

    READ_ONLY = "read_only"
    SUGGEST = "suggest"
    SANDBOX_TEST = "sandbox_test"
    DEPLOY_MINOR = "deploy_minor"
    DEPLOY_MAJOR = "deploy_major"


MOST_RESTRICTIVE = Tier.DEPLOY_MAJOR


@dataclass(frozen=True, kw_only=True)
class Bound:
    type: Literal["bool", "int", "float", "str"]  # the JSON type the value must have
    low: float | None = None  # smallest allowed number (int/float), inclusive
    high: float | None = None  # largest allowed number (int/float), inclusive
    choices: tuple[str, ...] = ()  # allowed strings; empty = any string up to max_len
    max_len: int = 2000  # longest allowed string

    def problem(self, value: object) -> str | None:
        """Why value is outside this bound, or None when it is inside."""
        kind = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}[self.type]
        if not isinstance(value, kind) or (self.type != "bool" and isinstance(value, bool)):
            return f"expected {self.type}, got {type(value).__name__}"
        if self.type in ("int", "float"):
            if self.low is not None and value < self.low:
                return f"{value} below {self.low}"
            if self.high is not None and value > self.high:
                return f"{value} above {self.high}"
        if self.type == "str":
            if self.choices and value not in self.choices:
                return f"{value!r} not one of {list(self.choices)}"
            if len(value) > self.max_len:
                return f"longer than {self.max_len} characters"
        return None


@dataclass(frozen=True, kw_only=True)
class ActionSpec:
    kind: str  # action kind name used in proposals
    tier: Tier  # tier of a proposal whose parameters are all within bounds
    bounds: Mapping[str, Bound] = field(default_factory=dict)  # exactly the parameters it takes
    target: str | None = None  # the only allowed target, or None for any (e.g. an expert id)
    description: str = ""  # one line for people


class ProposalIn(BaseModel):
    """A structured proposal as submitted by the agent or a member."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    target: str = Field(min_length=1, max_length=256)
    params: dict[str, ParamValue] = Field(default_factory=dict)
    rationale: str = Field(min_length=1, max_length=8000)


def classify(spec: ActionSpec | None, proposal: ProposalIn) -> tuple[Tier, str]:
    """Tier of a proposal and why; unknown kinds and anything out of bounds get the most restrictive tier."""
    if spec is None:
        return MOST_RESTRICTIVE, f"unknown action kind {proposal.kind!r}"
    if spec.target is not None and proposal.target != spec.target:
        return MOST_RESTRICTIVE, f"target {proposal.target!r} is not {spec.target!r}"
    missing = sorted(set(spec.bounds) - set(proposal.params))
    extra = sorted(set(proposal.params) - set(spec.bounds))
    if missing or extra:
        return MOST_RESTRICTIVE, f"parameters missing {missing} / undeclared {extra}"
    for name, bound in spec.bounds.items():
        problem = bound.problem(proposal.params[name])
        if problem:
            return MOST_RESTRICTIVE, f"{name}: {problem}"
    return spec.tier, "within declared bounds"


_ROUTER_POLICIES = ("random", "capacity", "latency", "learned", "posterior", "posterior-prompt")

BUILTIN_SPECS: dict[str, ActionSpec] = {
    spec.kind: spec
    for spec in (
        ActionSpec(kind="observe", tier=Tier.READ_ONLY, description="read cluster metrics; changes nothing",
                   bounds={"what": Bound(type="str", max_len=200)}),
        ActionSpec(kind="note", tier=Tier.SUGGEST, description="a suggestion for people to review; never applied",
                   bounds={"text": Bound(type="str", max_len=8000)}),
        ActionSpec(kind="set_default_k", tier=Tier.DEPLOY_MINOR, target="router",
                   bounds={"k": Bound(type="int", low=1, high=16)}, description="experts mixed per token"),
        ActionSpec(kind="set_selection_policy", tier=Tier.DEPLOY_MINOR, target="router",
                   bounds={"policy": Bound(type="str", choices=_ROUTER_POLICIES)},
                   description="default expert selection policy"),
        ActionSpec(kind="set_expert_weight", tier=Tier.SANDBOX_TEST,
                   bounds={"weight": Bound(type="float", low=0.0, high=4.0)},
                   description="mixing weight of one expert (target: expert id)"),
        ActionSpec(kind="quarantine_expert", tier=Tier.DEPLOY_MINOR,
                   bounds={"quarantined": Bound(type="bool")},
                   description="take an expert out of (or back into) selection (target: expert id)"),
        ActionSpec(kind="set_step_deadline", tier=Tier.DEPLOY_MINOR, target="router",
                   bounds={"seconds": Bound(type="float", low=0.05, high=30.0)},
                   description="per-token straggler deadline"),
        ActionSpec(kind="set_phase", tier=Tier.DEPLOY_MAJOR, target="mesh",
                   bounds={"phase": Bound(type="int", low=0, high=3)},
                   description="move the mesh to another phase (allowed in every phase)"),
    )
}
