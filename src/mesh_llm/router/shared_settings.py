"""Routers sharing one store follow each other's governance actions, so an applied change reaches them all.

Governance applies an approved action in the one process whose watch picks it up and records it in
gov_actions. Every router polls that table and runs its own handler for actions applied (or reverted)
since it started; the router kinds are idempotent setters, so the router that applied an action
setting the same value again changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging

from sqlalchemy import Engine, func, select

from mesh_llm.governance import phases
from mesh_llm.governance.actions import ActionRegistry
from mesh_llm.store.governance_tables import actions

log = logging.getLogger(__name__)


class ActionFollower:
    """Runs this router's handlers for the actions any process applies or reverts after it started."""

    def __init__(self, engine: Engine, registry: ActionRegistry) -> None:
        """Follow the gov_actions table of this store from its current end."""
        self.engine = engine
        self.registry = registry
        with engine.connect() as conn:
            self._start = conn.execute(select(func.coalesce(func.max(actions.c.id), 0))).scalar_one()
        self._seen: dict[int, str] = {}  # action id -> state it had when last read

    def step(self) -> int:
        """Apply newly applied actions (oldest first), then undo newly reverted ones (newest first); count them."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(actions).where(actions.c.id > self._start).order_by(actions.c.id)).all()
        applied, reverted = [], []
        for row in rows:
            before = self._seen.get(row.id)
            self._seen[row.id] = row.state
            if row.state == "applied" and before in (None, "applying"):
                applied.append(row)
            elif row.state == "reverted" and before not in (None, "reverted"):
                reverted.append(row)
        for row in applied:
            self._run(row, "apply", json.loads(row.params))
        for row in reversed(reverted):
            self._run(row, "revert", json.loads(row.inverse))
        return len(applied) + len(reverted)

    def _run(self, row, what: str, params: dict) -> None:
        handler = self.registry.handler(row.kind)
        if handler is None or row.kind == phases.PHASE_CHANGE_KIND:
            return  # a kind this router does not act on; the phase lives in the store, not in the router
        try:
            (handler.apply if what == "apply" else handler.revert)(row.target, params)
        except Exception as exc:  # e.g. an expert this router does not know: its registry stays as it is
            log.warning("could not %s action %d (%s %s) here: %s", what, row.id, row.kind, row.target, exc)


async def follow(follower: ActionFollower, governance, interval_s: float) -> None:
    """Forever: follower.step() off the event loop every interval_s."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await governance.off_loop(follower.step)
        except Exception:
            log.exception("following other routers' governance actions failed")
