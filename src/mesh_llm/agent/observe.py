"""A snapshot of the real cluster state (router status and the store) rendered into a task's prompt.

Only audit events whose particulars a verified member key or mesh-llm itself wrote reach the prompt;
refusals (which anyone can provoke, with a name and text of their choosing) are shown as counts by
operation and reason, never with their text.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mesh_llm.agent.tasks import FINAL, TaskStore
from mesh_llm.governance.audit import AuditRow
from mesh_llm.governance.core import Governance
from mesh_llm.governance.refusals import EVENT as GROUPED_REFUSALS
from mesh_llm.pb import router_pb2
from mesh_llm.router.client import router_status

log = logging.getLogger(__name__)

# events whose actor and particulars come from a verified member (or proposer) key or from mesh-llm itself
VERIFIED_EVENTS = frozenset({
    "halt", "halt_repeated", "resume_vote", "resumed", "vote", "proposal_submitted", "proposal_approved",
    "proposal_accepted", "proposal_rejected", "sandbox_result", "regression_reported", "action_applied",
    "action_failed", "action_reverted", "action_revert_failed", "members_reloaded", "state_repaired",
})
REFUSAL_EVENTS = frozenset({"refused", "agent_refused", GROUPED_REFUSALS})
_WORD = re.compile(r"^[A-Za-z_]{1,40}$")  # operation and error names as the code writes them


@dataclass(frozen=True, kw_only=True)
class ExpertView:
    expert_id: str  # registry id
    name: str  # donor label
    model_id: str  # model it serves
    state: str  # online, suspect, quarantined, gone
    rtt_ms: float  # smoothed Step round trip (0 while unmeasured)
    failures: int  # consecutive failures
    tokens_per_second: float  # reported decode speed
    weight: float  # mixing weight
    tokens_served: int  # tokens it contributed to
    in_subset: bool  # the task's generation may use it


@dataclass(frozen=True, kw_only=True)
class Snapshot:
    taken_at: float  # unix seconds
    experts: tuple[ExpertView, ...]  # every expert the router knows
    default_k: int  # experts mixed per token by default
    default_policy: str  # selection policy in use
    default_mix: str  # aggregation rule in use
    phase: int  # governance phase
    halted: bool  # the mesh is halted
    halt_reason: str  # why
    recent_tokens_per_second: float  # router throughput over the last minute
    active_generations: int  # streams running now
    rtt_percentiles_ms: dict  # p50, p90, max of the online experts' smoothed RTTs
    refusals: tuple[str, ...]  # recent refusals counted by operation and reason ("vote DoubleVote, member: 2")
    refusal_total: int  # how many refusals those lines count
    events: tuple[str, ...]  # recent verified audit events, one line each
    recent_tasks: tuple[str, ...]  # recent finished agent tasks, one line each

    def online(self, subset: Iterable[str] | None = None) -> list[ExpertView]:
        """Online experts, optionally only those in subset."""
        keep = set(subset) if subset is not None else None
        return [e for e in self.experts if e.state == "online" and (keep is None or e.expert_id in keep)]

    def summary(self) -> dict:
        """A few numbers for the audit log."""
        return {"experts": len(self.experts), "online": len(self.online()), "default_k": self.default_k,
                "policy": self.default_policy, "phase": self.phase, "halted": self.halted,
                "recent_tokens_per_second": round(self.recent_tokens_per_second, 3),
                "refusals": self.refusal_total}


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def _audit_line(row: AuditRow) -> str:
    detail = json.loads(row.detail)
    short = ", ".join(f"{k}={str(v)[:60]}" for k, v in sorted(detail.items()) if v not in ("", None, [], {}))
    return f"{_when(row.ts)} {row.event} by {row.actor}: {short}"[:240]


def refusal_counts(rows: Iterable[AuditRow]) -> Counter[str]:
    """Refusals in rows counted by operation, reason and who was refused; no text from the refused call."""
    counts: Counter[str] = Counter()
    for row in rows:
        if row.event not in REFUSAL_EVENTS:
            continue
        detail = json.loads(row.detail)
        if row.event == GROUPED_REFUSALS:
            for key, count in dict(detail.get("by") or {}).items():
                op, _, reason = str(key).partition(":")
                counts[f"{_word(op)} {_word(reason)}, unauthenticated"] += int(count)
        elif row.event == "refused":
            counts[f"{_word(detail.get('op'))} {_word(detail.get('error'))}, member"] += 1
        else:
            counts["agent task refused"] += 1
    return counts


def _word(value) -> str:
    return value if isinstance(value, str) and _WORD.match(value) else "other"


def percentiles(values: list[float]) -> dict:
    """p50, p90 and max of values (empty dict when there are none)."""
    if not values:
        return {}
    arr = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)), "max": float(arr.max())}


def from_status(status: router_pb2.RouterStatus, *, subset: Iterable[str] | None, audit_rows: list[AuditRow],
                finished: list, taken_at: float, max_events: int = 12) -> Snapshot:
    """Snapshot of a RouterStatus, the store's audit rows (oldest first) and finished tasks."""
    keep = set(subset) if subset else None
    experts = tuple(ExpertView(expert_id=e.expert_id, name=e.name, model_id=e.model_id, state=e.state,
                               rtt_ms=e.rtt_ms, failures=e.failures, tokens_per_second=e.tokens_per_second,
                               weight=e.weight, tokens_served=e.tokens_served,
                               in_subset=keep is None or e.expert_id in keep) for e in status.experts)
    rtts = [e.rtt_ms for e in experts if e.state == "online" and e.rtt_ms > 0]
    refusals = refusal_counts(audit_rows)
    verified = [r for r in audit_rows if r.event in VERIFIED_EVENTS]
    tasks = [f"task {t.id} {t.type}: {t.state}"
             + (f" ({t.proposal['kind']} -> {t.tier})" if t.proposal else "")
             + (f": {(t.outcome or t.error)[:100]}" if (t.outcome or t.error) else "") for t in finished]
    return Snapshot(taken_at=taken_at, experts=experts, default_k=status.default_k,
                    default_policy=status.default_policy, default_mix=status.default_mix, phase=status.phase,
                    halted=status.halted, halt_reason=status.halt_reason,
                    recent_tokens_per_second=status.recent_tokens_per_second,
                    active_generations=status.active_generations, rtt_percentiles_ms=percentiles(rtts),
                    refusals=tuple(f"{what}: {n}" for what, n in refusals.most_common(max_events)),
                    refusal_total=sum(refusals.values()),
                    events=tuple(_audit_line(r) for r in verified[-max_events:]),
                    recent_tasks=tuple(tasks))


async def take(router: str, gov: Governance, store: TaskStore, *, subset: Iterable[str] | None = None,
               audit_window: int = 200) -> Snapshot:
    """Observe the router (GetRouterStatus over gRPC) and the store (audit log, finished tasks)."""
    status = await router_status(router)
    rows = gov.audit_rows(audit_window)
    finished = store.list(states=FINAL, limit=5)
    return from_status(status, subset=subset, audit_rows=rows, finished=finished, taken_at=store.clock())


def render(snap: Snapshot, budget_chars: int = 3000) -> str:
    """The snapshot as prompt text of at most about budget_chars (older events dropped first)."""
    head = [f"Mesh: phase {snap.phase}, {'HALTED: ' + snap.halt_reason if snap.halted else 'running'}; "
            f"default k={snap.default_k}, selection policy {snap.default_policy}, mix {snap.default_mix}; "
            f"{snap.recent_tokens_per_second:.2f} tokens/s over the last minute, "
            f"{snap.active_generations} generation(s) running."]
    if snap.rtt_percentiles_ms:
        p = snap.rtt_percentiles_ms
        head.append(f"Expert round trip ms: p50 {p['p50']:.1f}, p90 {p['p90']:.1f}, max {p['max']:.1f}.")
    head.append("Experts:")
    for e in snap.experts:
        head.append(f"- {e.expert_id} ({e.name or e.model_id}) {e.state}, rtt {e.rtt_ms:.1f} ms, "
                    f"{e.failures} failures, {e.tokens_per_second:.1f} tok/s, weight {e.weight:g}, "
                    f"{e.tokens_served} tokens served{'' if e.in_subset else ', other subset'}")
    sections = [(f"Recent refusals ({snap.refusal_total}, counted by operation and reason):", list(snap.refusals)),
                ("Recent audit events:", list(snap.events)),
                ("Recent agent tasks:", list(snap.recent_tasks))]
    text = "\n".join(head)
    for title, lines in sections:
        if not lines:
            continue
        room = budget_chars - len(text) - len(title) - 2
        kept: list[str] = []
        for line in reversed(lines):  # newest first survive
            if room - len(line) - 1 < 0:
                break
            kept.insert(0, line)
            room -= len(line) + 1
        if kept:
            text += "\n" + title + "\n" + "\n".join(kept)
    return text[: max(budget_chars, 200)]
