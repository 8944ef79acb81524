"""Registry of action handlers: each applies a change and returns the parameters that undo it."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update

from mesh_llm.governance.errors import ActionError
from mesh_llm.governance.tiers import BUILTIN_SPECS, ActionSpec, Bound, ProposalIn, Tier, classify
from mesh_llm.store.governance_tables import actions

log = logging.getLogger(__name__)

ApplyFn = Callable[[str, dict], dict]  # (target, params) -> inverse params


@dataclass(frozen=True, kw_only=True)
class Handler:
    spec: ActionSpec  # kind, tier and parameter bounds
    apply: ApplyFn  # makes the change; returns params that undo it
    revert: ApplyFn  # undoes it given those params (defaults to apply)


class ActionRegistry:
    """Action kinds governance knows (built-ins from the start) and the handlers subsystems register."""

    def __init__(self, specs: Mapping[str, ActionSpec] = BUILTIN_SPECS) -> None:
        """Start with these declared kinds and no handlers."""
        self._specs = dict(specs)
        self._handlers: dict[str, Handler] = {}
        self._lock = threading.Lock()
        self._on_register: list[Callable[[str], None]] = []

    def register(self, kind: str, apply: ApplyFn, *, revert: ApplyFn | None = None, tier: Tier | None = None,
                 bounds: Mapping[str, Bound] | None = None, target: str | None = None, description: str = "") -> None:
        """Register the handler of an action kind; built-in kinds keep their declared tier and bounds."""
        builtin = self._specs.get(kind)
        if builtin is None:
            if tier is None or bounds is None:
                raise ActionError(f"new action kind {kind!r} must declare its tier and parameter bounds")
            spec = ActionSpec(kind=kind, tier=tier, bounds=dict(bounds), target=target, description=description)
        elif tier is not None or bounds is not None or target is not None:
            raise ActionError(f"{kind!r} is declared by governance; its tier and bounds cannot be changed")
        else:
            spec = builtin
        with self._lock:
            self._specs[kind] = spec
            self._handlers[kind] = Handler(spec=spec, apply=apply, revert=revert or apply)
            callbacks = list(self._on_register)
        log.info("registered action handler %s (tier %s)", kind, spec.tier.value)
        for callback in callbacks:
            callback(kind)

    def on_register(self, callback: Callable[[str], None]) -> None:
        """Call callback(kind) after each registration (Governance runs pending reverts)."""
        with self._lock:
            self._on_register.append(callback)

    def spec(self, kind: str) -> ActionSpec | None:
        """Declared spec of kind, or None when unknown."""
        return self._specs.get(kind)

    def handler(self, kind: str) -> Handler | None:
        """Registered handler of kind, or None."""
        return self._handlers.get(kind)

    def kinds(self) -> list[ActionSpec]:
        """Every declared action kind."""
        return sorted(self._specs.values(), key=lambda s: s.kind)

    def classify(self, proposal: ProposalIn) -> tuple[Tier, str]:
        """Tier of a proposal under the declared specs."""
        return classify(self.spec(proposal.kind), proposal)


def record_applied(conn: Connection, *, proposal_id: int | None, kind: str, target: str, params: dict,
                   inverse: dict, ts: float) -> int:
    """Store an applied action with its inverse; return its id."""
    result = conn.execute(insert(actions).values(
        proposal_id=proposal_id, kind=kind, target=target, params=json.dumps(params), inverse=json.dumps(inverse),
        applied_at=ts, state="applied"))
    return result.inserted_primary_key[0]


def request_reverts(conn: Connection, *, last: int, halt_id: int) -> list[int]:
    """Mark the `last` most recently applied actions for reverting; return their ids, newest first."""
    ids = conn.execute(select(actions.c.id).where(actions.c.state == "applied")
                       .order_by(actions.c.id.desc()).limit(last)).scalars().all()
    if ids:
        conn.execute(update(actions).where(actions.c.id.in_(ids)).values(state="revert_requested", halt_id=halt_id))
    return list(ids)


def pending_reverts(conn: Connection) -> list:
    """Actions waiting to be reverted, newest first."""
    return conn.execute(select(actions).where(actions.c.state == "revert_requested")
                        .order_by(actions.c.id.desc())).all()


def mark(conn: Connection, action_id: int, *, state: str, from_state: str, ts: float) -> bool:
    """Move an action from one state to another; False when another process already did."""
    values = {"state": state, "reverted_at": ts} if state == "reverted" else {"state": state}
    result = conn.execute(update(actions).where(actions.c.id == action_id, actions.c.state == from_state)
                          .values(**values))
    return result.rowcount == 1
