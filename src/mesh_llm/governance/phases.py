"""The mesh's current phase (stored) and what it allows."""

from __future__ import annotations

import logging

from sqlalchemy import Connection, insert, select, update

from mesh_llm.governance.policy import PhaseRule, Policy
from mesh_llm.governance.tiers import Tier
from mesh_llm.store.governance_tables import state

log = logging.getLogger(__name__)

_KEY = "phase"
PHASE_CHANGE_KIND = "set_phase"  # the one kind allowed in every phase, so transitions are votes


def current(conn: Connection, policy: Policy) -> int:
    """Stored phase, or the policy's initial phase on a fresh store."""
    value = conn.execute(select(state.c.value).where(state.c.key == _KEY)).scalar()
    return policy.initial_phase if value is None else int(value)


def store(conn: Connection, phase: int) -> None:
    """Record a new current phase."""
    if conn.execute(update(state).where(state.c.key == _KEY).values(value=str(phase))).rowcount == 0:
        conn.execute(insert(state).values(key=_KEY, value=str(phase)))


def allows(rule: PhaseRule, tier: Tier, kind: str) -> bool:
    """Whether a proposal of this tier and kind may be made in a phase."""
    return kind == PHASE_CHANGE_KIND or tier in rule.tiers
