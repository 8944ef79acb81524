"""The JSON schema a task's output must satisfy, built from governance's ActionSpecs, and an independent checker.

The router masks every sampled token with this schema's grammar, so even a random model can only
write a proposal that passes check(). Every string is limited to plain characters (no quotes or
escapes) and a length, and every float to a grid of values inside its bounds, so the longest
admissible output is known (max_chars) and the generation can be given room for it. A generated
rationale begins with one fact observed in the cluster state (facts), so it always cites what was seen;
check() accepts any bounded rationale (a member's own text need not), and agent.usefulness judges it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mesh_llm.errors import MeshError
from mesh_llm.governance.tiers import ActionSpec, Bound

log = logging.getLogger(__name__)

TEXT_CHARS = r"A-Za-z0-9 ,.;:()'/%+=_-"  # characters free text may use: nothing JSON must escape
EXPERT_TARGET_KINDS = frozenset({"set_expert_weight", "quarantine_expert"})  # target must be an online expert
MESH_TARGETS = ("mesh", "router")  # targets of kinds that name no fixed target and no expert
REASON_MIN = 12  # characters of reason a generated rationale gives after its fact
ENUM_INT_SPAN = 64  # integer ranges up to this many values become enums
_KEYS = ("kind", "target", "params", "rationale")


class OutputProblem(MeshError):
    """Generated text that is not a proposal under the task's schema; `refusal` when it is well-formed JSON."""

    def __init__(self, message: str, *, refusal: bool):
        super().__init__(message)
        self.refusal = refusal


@dataclass(frozen=True, kw_only=True)
class ParamRule:
    schema: dict  # JSON schema of the value
    choices: tuple | None  # allowed values when enumerated
    kind: str  # bool, int, float or str
    low: float | None  # smallest number allowed
    high: float | None  # largest number allowed
    max_len: int  # longest string allowed (str only)
    longest: int  # characters of the longest JSON value admitted

    def problem(self, value: object) -> str | None:
        """Why value is not admitted, or None."""
        if self.choices is not None:
            same_type = [c for c in self.choices if type(c) is type(value) or
                         (isinstance(c, float) and isinstance(value, int) and not isinstance(value, bool))]
            return None if any(c == value for c in same_type) else f"{value!r} is not one of {list(self.choices)}"
        if self.kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                return f"expected an integer, got {value!r}"
            return None if self.low <= value <= self.high else f"{value} is outside {self.low:g}..{self.high:g}"
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
        if not isinstance(value, str):
            return f"expected a string, got {value!r}"
        return _text_problem(value, self.max_len)


@dataclass(frozen=True, kw_only=True)
class ProposalSchema:
    schema: dict  # the JSON schema sent with the GenerateRequest
    specs: dict[str, ActionSpec]  # kinds it admits, with their governance specs
    targets: dict[str, tuple[str, ...]]  # allowed targets per kind
    params: dict[str, dict[str, ParamRule]]  # parameter rules per kind
    rationale_max: int  # longest rationale
    max_chars: int  # characters of the longest admissible output
    facts: tuple[str, ...] = ()  # observed facts a generated rationale must begin with (none: free text)

    @property
    def kinds(self) -> tuple[str, ...]:
        """Kinds the schema admits."""
        return tuple(self.specs)

    def text(self) -> str:
        """The schema as JSON text."""
        return json.dumps(self.schema, separators=(",", ":"))


def _text_problem(value: str, max_len: int) -> str | None:
    if not 1 <= len(value) <= max_len:
        return f"text of {len(value)} characters (allowed 1..{max_len})"
    if not re.fullmatch(f"[{TEXT_CHARS}]+", value):
        return "text has characters outside letters, digits, spaces and ,.;:()'/%+=_-"
    return None


def _text_schema(max_len: int) -> dict:
    return {"type": "string", "pattern": f"^[{TEXT_CHARS}]{{1,{max_len}}}$"}


def _literal(text: str) -> str:
    return "".join("\\" + c if c in ".()+" else c for c in text)  # the regex characters TEXT_CHARS admits


def _rationale_schema(max_len: int, facts: tuple[str, ...]) -> dict:
    """Free text, or text that begins with one of facts when there are any (the whole within max_len)."""
    if not facts:
        return _text_schema(max_len)
    rest = max_len - max(len(f) for f in facts) - 2
    return {"type": "string",
            "pattern": f"^(?:{'|'.join(_literal(f) for f in facts)})[,;:] [{TEXT_CHARS}]{{{REASON_MIN},{rest}}}$"}


def usable_facts(facts: Iterable[str], rationale_max: int) -> tuple[str, ...]:
    """The facts a rationale may begin with: plain text, short enough to leave room for a reason."""
    room = rationale_max - REASON_MIN - 2
    return tuple(f for f in dict.fromkeys(facts) if 0 < len(f) <= room and _text_problem(f, len(f)) is None)


def float_grid(low: float, high: float) -> tuple[float, ...]:
    """A short list of round values from low to high inclusive (log-spaced over wide positive ranges)."""
    if low > 0 and high / low > 20:
        values = {low, high}
        for exp in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
            for mantissa in (1, 2, 5):
                v = round(mantissa * 10.0 ** exp, 6)
                if low <= v <= high:
                    values.add(v)
        return tuple(sorted(values))
    steps = 16
    return tuple(sorted({round(low + (high - low) * i / steps, 4) for i in range(steps + 1)}))


def param_rule(bound: Bound, text_max: int) -> ParamRule:
    """The schema rule of one declared parameter bound (never wider than the bound)."""
    if bound.type == "bool":
        return ParamRule(schema={"type": "boolean"}, choices=None, kind="bool", low=None, high=None, max_len=0,
                         longest=5)
    if bound.type == "str":
        if bound.choices:
            return ParamRule(schema={"enum": list(bound.choices)}, choices=tuple(bound.choices), kind="str",
                             low=None, high=None, max_len=0, longest=max(len(json.dumps(c)) for c in bound.choices))
        n = min(bound.max_len, text_max)
        return ParamRule(schema=_text_schema(n), choices=None, kind="str", low=None, high=None, max_len=n,
                         longest=n + 2)
    low = bound.low if bound.low is not None else -1e6
    high = bound.high if bound.high is not None else 1e6
    if bound.type == "int":
        lo, hi = math.ceil(low), math.floor(high)
        if hi - lo < ENUM_INT_SPAN:
            values = tuple(range(lo, hi + 1))
            return ParamRule(schema={"enum": list(values)}, choices=values, kind="int", low=lo, high=hi, max_len=0,
                             longest=max(len(str(v)) for v in values))
        return ParamRule(schema={"type": "integer", "minimum": lo, "maximum": hi}, choices=None, kind="int",
                         low=lo, high=hi, max_len=0, longest=max(len(str(lo)), len(str(hi))))
    grid = float_grid(low, high)
    return ParamRule(schema={"enum": list(grid)}, choices=grid, kind="float", low=low, high=high, max_len=0,
                     longest=max(len(json.dumps(v)) for v in grid))


def targets_of(spec: ActionSpec, experts: Iterable[str]) -> tuple[str, ...]:
    """Targets a proposal of this kind may name: its fixed target, an online expert, or mesh/router."""
    if spec.target is not None:
        return (spec.target,)
    if spec.kind in EXPERT_TARGET_KINDS:
        return tuple(experts)
    return (*MESH_TARGETS, *experts)


def build(specs: Iterable[ActionSpec], *, experts: Iterable[str], rationale_max: int = 160,
          text_max: int = 200, facts: Iterable[str] = ()) -> ProposalSchema:
    """anyOf one object per kind: const kind, target enum, bounded params, bounded rationale (led by a fact)."""
    experts = tuple(sorted(experts))
    facts = usable_facts(facts, rationale_max)
    branches, kept, targets, params = [], {}, {}, {}
    for spec in specs:
        allowed = targets_of(spec, experts)
        if not allowed:
            continue  # an expert-targeted kind with no expert online
        rules = {name: param_rule(bound, text_max) for name, bound in sorted(spec.bounds.items())}
        kept[spec.kind], targets[spec.kind], params[spec.kind] = spec, allowed, rules
        branches.append({
            "type": "object",
            "properties": {
                "kind": {"const": spec.kind},
                "target": {"enum": list(allowed)},
                "params": {"type": "object", "properties": {n: r.schema for n, r in rules.items()},
                           "required": list(rules), "additionalProperties": False},
                "rationale": _rationale_schema(rationale_max, facts),
            },
            "required": list(_KEYS),
            "additionalProperties": False,
        })
    if not branches:
        raise MeshError("no action kind can be proposed here (an expert-targeted kind needs an online expert)")
    longest = 0
    for kind, spec in kept.items():
        shell = json.dumps({"kind": kind, "target": "", "params": {n: None for n in params[kind]}, "rationale": ""},
                           separators=(",", ":"))
        size = len(shell) - 4 * len(params[kind]) + sum(r.longest for r in params[kind].values())
        size += max(len(t) for t in targets[kind]) + rationale_max
        longest = max(longest, size)
    schema = branches[0] if len(branches) == 1 else {"anyOf": branches}
    return ProposalSchema(schema=schema, specs=kept, targets=targets, params=params, rationale_max=rationale_max,
                          max_chars=longest, facts=facts)


def check(schema: ProposalSchema, text: str) -> dict:
    """The proposal in text if it is valid under schema (checked without the grammar engine); OutputProblem if not."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise OutputProblem(f"output is not JSON ({exc}): {text[:200]!r}", refusal=False) from None
    if not isinstance(value, dict) or tuple(sorted(value)) != tuple(sorted(_KEYS)):
        keys = sorted(value) if isinstance(value, dict) else type(value).__name__
        raise OutputProblem(f"output must be an object with keys {list(_KEYS)}, got {keys}", refusal=False)
    kind = value["kind"]
    if kind not in schema.specs:
        raise OutputProblem(f"action kind {kind!r} is not one this task may propose ({', '.join(schema.kinds)})",
                            refusal=True)
    if value["target"] not in schema.targets[kind]:
        raise OutputProblem(f"target {value['target']!r} is not an allowed target of {kind} "
                            f"({', '.join(schema.targets[kind])}); unknown or offline expert?", refusal=True)
    params = value["params"]
    rules = schema.params[kind]
    if not isinstance(params, dict) or set(params) != set(rules):
        raise OutputProblem(f"{kind} takes parameters {sorted(rules)}, got "
                            f"{sorted(params) if isinstance(params, dict) else params!r}", refusal=True)
    for name, rule in rules.items():
        problem = rule.problem(params[name])
        if problem:
            raise OutputProblem(f"parameter {name} of {kind} is out of bounds: {problem}", refusal=True)
    rationale = value["rationale"]
    problem = _text_problem(rationale, schema.rationale_max) if isinstance(rationale, str) else "not a string"
    if problem:
        raise OutputProblem(f"rationale: {problem}", refusal=True)
    return value
