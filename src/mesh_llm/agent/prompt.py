"""The prompt of one task: its goal, the observed cluster state, the submitter's context, the allowed actions."""

from __future__ import annotations

import logging

from mesh_llm.agent.observe import Snapshot, render
from mesh_llm.agent.schema import ProposalSchema
from mesh_llm.agent.tasks import TASK_TYPES

log = logging.getLogger(__name__)

PREAMBLE = ("You are the self-improvement agent of mesh-llm, a mesh of language models that a router mixes "
            "K of N per token. Propose one change (or report) for the cluster below. Governance decides whether "
            "it takes effect.")


def _action_line(schema: ProposalSchema, kind: str) -> str:
    spec = schema.specs[kind]
    params = []
    for name, rule in schema.params[kind].items():
        if rule.choices is not None and len(rule.choices) <= 6:
            params.append(f"{name} one of {', '.join(map(str, rule.choices))}")
        elif rule.kind in ("int", "float"):
            params.append(f"{name} {rule.kind} {rule.low:g}..{rule.high:g}")
        else:
            params.append(f"{name} {rule.kind}")
    targets = schema.targets[kind]
    shown = ", ".join(targets[:4]) + (", ..." if len(targets) > 4 else "")
    return f"- {kind} (tier {spec.tier.value}; target {shown}; {'; '.join(params) or 'no params'}): {spec.description}"


def build_prompt(task_type: str, snap: Snapshot, schema: ProposalSchema, *, context: str = "",
                 budget_chars: int = 3000) -> str:
    """Prompt text for a task; the observation gets what budget_chars leaves after the fixed parts."""
    goal = TASK_TYPES[task_type].goal
    actions = "\n".join(_action_line(schema, kind) for kind in schema.kinds)
    extra = f"\nContext from the submitter:\n{context}" if context else ""
    cite = ("Begin the rationale with the observed value that motivates your choice (an expert and its rtt, "
            "failures, speed, weight or tokens served), then say why." if schema.facts else
            "In the rationale, name the observation above that motivates your choice.")
    tail = (f"Task ({task_type}): {goal}\nAllowed actions:\n{actions}\n"
            f"Reply with one JSON object with the keys kind, target, params and rationale. {cite}")
    fixed = len(PREAMBLE) + len(tail) + len(extra) + 32
    state = render(snap, max(budget_chars - fixed, 200))
    return f"{PREAMBLE}\nCluster state:\n{state}{extra}\n{tail}"
