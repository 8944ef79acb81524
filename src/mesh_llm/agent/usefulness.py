"""Whether a schema-valid proposal says anything: a proposal that changes nothing, carries filler text, copies
its rationale from the prompt or cites no observed metric is refused as a no-op before governance sees it.

The grammar guarantees the shape of a proposal, not its sense: `{"kind": "note", "params": {"text": "1"}}`
is schema-valid. These checks are cheap, deterministic and independent of the model.
"""

from __future__ import annotations

import logging
import re
from difflib import SequenceMatcher

from mesh_llm.agent.observe import Snapshot, render
from mesh_llm.agent.schema import ProposalSchema

log = logging.getLogger(__name__)

MIN_WORDS = 3  # different words of two or more letters a free-text parameter needs
COPY_MIN_CHARS = 24  # a shared stretch this long ...
COPY_SHARE = 0.7  # ... covering this share of the text makes it a copy of the prompt
# words naming what the observation measures (whole words, any case)
METRIC = re.compile(r"\b(rtt|latency|round trip|ms|failures?|tokens/s|tok/s|throughput|weight|served|refusals?|"
                    r"halt(ed)?|p50|p90|online|suspect|quarantined|offline|slow(er|est)?|fast(er|est)?|nll|"
                    r"policy|experts? mixed)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z]{2,}")


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def copied_from(text: str, source: str) -> bool:
    """Whether text is mostly one stretch of source (case and spacing ignored)."""
    a, b = _normal(source), _normal(text)
    if len(b) < COPY_MIN_CHARS:
        return False
    match = SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b))
    return match.size >= COPY_MIN_CHARS and match.size >= COPY_SHARE * len(b)


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(text)


def _telling(number: str) -> bool:
    """Whether number has two significant digits or more (too specific to match the observation by chance)."""
    return len(number.replace(".", "").lstrip("0")) >= 2


def _same_number(cited: str, seen: str) -> bool:
    places = len(cited.partition(".")[2])
    return abs(float(cited) - float(seen)) <= 0.5 * 10.0 ** -places


def cited_metrics(rationale: str, snap: Snapshot) -> list[str]:
    """Numbers in rationale that the observation shows, or expert ids it names, when it also names a metric."""
    if not METRIC.search(rationale):
        return []
    return _cited(rationale, snap, _observed_numbers(snap))


def _observed_numbers(snap: Snapshot) -> set[str]:
    return set(_numbers(render(snap, budget_chars=1 << 20)))


def _cited(rationale: str, snap: Snapshot, seen: set[str]) -> list[str]:
    cited = [n for n in _numbers(rationale) if _telling(n) and any(_same_number(n, s) for s in seen)]
    cited += [e.expert_id for e in snap.experts if e.expert_id in rationale]
    return cited


def _noop(proposal: dict, snap: Snapshot) -> str | None:
    """Why the proposal would leave the observed setting as it is, or None."""
    kind, target, params = proposal["kind"], proposal["target"], proposal["params"]
    expert = next((e for e in snap.experts if e.expert_id == target), None)
    if kind == "set_default_k" and params.get("k") == snap.default_k:
        return f"k is {snap.default_k} already"
    if kind == "set_selection_policy" and params.get("policy") == snap.default_policy:
        return f"the selection policy is {snap.default_policy} already"
    if kind == "set_phase" and params.get("phase") == snap.phase:
        return f"the mesh is in phase {snap.phase} already"
    if expert is not None and kind == "set_expert_weight" and params.get("weight") == expert.weight:
        return f"{target} has weight {expert.weight:g} already"
    if expert is not None and kind == "quarantine_expert" and params.get("quarantined") == (
            expert.state == "quarantined"):
        return f"{target} is {expert.state} already"
    return None


def free_text_params(schema: ProposalSchema, kind: str) -> tuple[str, ...]:
    """Parameters of kind that take free text (not a choice among fixed values)."""
    return tuple(name for name, rule in schema.params.get(kind, {}).items() if rule.kind == "str" and not rule.choices)


def problems(proposal: dict, *, prompt: str, snap: Snapshot, free_text: tuple[str, ...] = ()) -> list[str]:
    """What makes a schema-valid proposal a no-op (empty when it is useful); free_text names its text parameters."""
    found = []
    why = _noop(proposal, snap)
    if why:
        found.append(f"it changes nothing ({why})")
    for name in free_text:
        value = proposal["params"].get(name)
        if not isinstance(value, str):
            continue
        if len({w.lower() for w in _WORD.findall(value)}) < MIN_WORDS:
            found.append(f"parameter {name} {value[:40]!r} has fewer than {MIN_WORDS} different words")
        elif copied_from(value, prompt):
            found.append(f"parameter {name} is copied from the prompt")
    rationale = proposal["rationale"]
    if copied_from(rationale, prompt):
        found.append("the rationale is copied from the prompt")
    elif not cited_metrics(rationale, snap):
        found.append("the rationale cites no observed metric (a number or expert from the cluster state with what it "
                     "measures, e.g. 'rtt 41.2 ms')")
    return found


def citable_facts(snap: Snapshot, expert_ids: list[str], limit: int = 40) -> list[str]:
    """Observed facts about expert_ids and the mesh, phrased so that cited_metrics accepts each one."""
    facts = []
    p = snap.rtt_percentiles_ms
    if p:
        facts += [f"p50 rtt {p['p50']:.1f} ms", f"p90 rtt {p['p90']:.1f} ms"]
    facts.append(f"router {snap.recent_tokens_per_second:.2f} tokens/s in the last minute")  # not the prompt's words
    keep = set(expert_ids)
    rows = [(f"{e.expert_id} rtt {e.rtt_ms:.1f} ms", f"{e.expert_id} {e.failures} failures",
             f"{e.expert_id} {e.tokens_per_second:.1f} tok/s", f"{e.expert_id} {e.tokens_served} tokens served",
             f"{e.expert_id} weight {e.weight:g}") for e in snap.experts if e.expert_id in keep]
    facts += [fact for measure in zip(*rows) for fact in measure]  # measure by measure: a cut keeps every expert
    seen = _observed_numbers(snap)  # rendered once, not once per fact
    return [f for f in facts if METRIC.search(f) and _cited(f, snap, seen)][:limit]
