"""Applying approved proposals through their handlers, and reverting applied actions."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from sqlalchemy import Engine

from mesh_llm.governance import actions as action_store
from mesh_llm.governance import audit
from mesh_llm.governance import proposals as prop
from mesh_llm.governance.actions import ActionRegistry
from mesh_llm.governance.errors import ActionError
from mesh_llm.governance.killswitch import current_halt
from mesh_llm.governance.tx import write_tx

log = logging.getLogger(__name__)


class ActionRunner:
    """Runs handlers outside any transaction and records the outcome (and inverse) in the store."""

    def __init__(self, *, engine: Engine, registry: ActionRegistry, clock: Callable[[], float],
                 is_halted: Callable[[], bool], confirmed: Callable[[int], bool] = lambda _pid: True) -> None:
        """Apply through registry's handlers unless is_halted(); only proposals whose approval confirmed(id)."""
        self.engine = engine
        self.registry = registry
        self.clock = clock
        self.is_halted = is_halted
        self.confirmed = confirmed

    def apply_due(self) -> list[int]:
        """Apply approved proposals whose timelock has passed and whose handler is registered."""
        if self.is_halted():
            return []
        with self.engine.connect() as conn:
            due = prop.due(conn, self.clock())
        return [row.id for row in due
                if self.registry.handler(row.kind) and self.confirmed(row.id) and self._apply(row)]

    def _apply(self, row) -> bool:
        handler = self.registry.handler(row.kind)
        with write_tx(self.engine) as conn:
            if self.is_halted() or current_halt(conn) is not None:
                return False
            if not prop.set_status(conn, row.id, "applying", from_status=prop.APPROVED):
                return False  # another process claimed it
        params = json.loads(row.params)
        try:
            inverse = handler.apply(row.target, dict(params))
            if not isinstance(inverse, dict):
                raise ActionError(f"handler of {row.kind} returned {type(inverse).__name__}, not inverse params")
        except Exception as exc:
            log.exception("applying proposal %d (%s) failed", row.id, row.kind)
            with write_tx(self.engine) as conn:
                prop.set_status(conn, row.id, "failed")
                audit.append(conn, ts=self.clock(), event="action_failed", actor="governance",
                             detail={"proposal_id": row.id, "kind": row.kind, "error": repr(exc)})
            return False
        now = self.clock()
        with write_tx(self.engine) as conn:
            action_id = action_store.record_applied(conn, proposal_id=row.id, kind=row.kind, target=row.target,
                                                    params=params, inverse=inverse, ts=now)
            prop.set_status(conn, row.id, "applied")
            audit.append(conn, ts=now, event="action_applied", actor="governance",
                         detail={"proposal_id": row.id, "action_id": action_id, "kind": row.kind,
                                 "target": row.target, "params": params, "inverse": inverse})
        log.info("applied proposal %d: %s %s %s", row.id, row.kind, row.target, params)
        return True

    def run_pending_reverts(self) -> list[int]:
        """Revert every action marked for reverting whose handler is registered, newest first."""
        with self.engine.connect() as conn:
            pending = action_store.pending_reverts(conn)
        done = []
        for row in pending:
            handler = self.registry.handler(row.kind)
            if handler is None:
                log.warning("action %d (%s) waits for its handler to be reverted", row.id, row.kind)
                continue
            with write_tx(self.engine) as conn:
                if not action_store.mark(conn, row.id, state="reverting", from_state="revert_requested", ts=0):
                    continue
            try:
                handler.revert(row.target, json.loads(row.inverse))
                state, error = "reverted", ""
            except Exception as exc:
                log.exception("reverting action %d (%s) failed", row.id, row.kind)
                state, error = "revert_failed", repr(exc)
            now = self.clock()
            with write_tx(self.engine) as conn:
                action_store.mark(conn, row.id, state=state, from_state="reverting", ts=now)
                if state == "reverted" and row.proposal_id is not None:
                    prop.set_status(conn, row.proposal_id, "reverted")
                audit.append(conn, ts=now, event=f"action_{state}", actor="governance",
                             detail={"action_id": row.id, "proposal_id": row.proposal_id, "kind": row.kind,
                                     "target": row.target, "inverse": json.loads(row.inverse), "error": error})
            done.append(row.id)
        return done
