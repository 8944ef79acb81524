"""The audit log as the source of truth: the state it implies, and where the state tables disagree with it.

Every change to halts, resume votes, votes, proposals, applied actions and the phase is written in
the same transaction as its audit row, so replaying the log gives what those tables must hold. A
row deleted or edited in a table (the halt row removed to resume the mesh, a proposal set to
approved, an action marked reverted) shows up as a mismatch naming the table and the audit row.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from sqlalchemy import Connection, delete, insert, select, update

from mesh_llm.governance.audit import AuditRow
from mesh_llm.governance.phases import PHASE_CHANGE_KIND
from mesh_llm.store.governance_tables import actions, audit, halts, proposals, resume_votes, state, votes

log = logging.getLogger(__name__)

# table states that an unlogged, in-flight step may leave while the log still shows the step before
_IN_FLIGHT = {("approved", "applying"), ("revert_requested", "reverting")}


@dataclass(frozen=True, kw_only=True)
class Mismatch:
    table: str  # state table that disagrees with the log
    seq: int | None  # audit row the table contradicts (None: a table row the log never recorded)
    problem: str  # what differs (ids and column names only, never text taken from the table)


@dataclass(kw_only=True)
class LogState:
    seq: int = 0  # last audit row replayed
    hash: str = ""  # its hash (a different hash there later means the log was rewritten)
    halts: dict[int, dict] = field(default_factory=dict)  # halt id -> seq, reason, halted_by, halted_at, resumed_at
    resume_votes: dict[tuple[int, str], dict] = field(default_factory=dict)  # (halt id, member) -> seq, ts
    votes: dict[tuple[int, str], tuple[str, int]] = field(default_factory=dict)  # (proposal, member) -> choice, seq
    proposals: dict[int, dict] = field(default_factory=dict)  # id -> seq, kind, target, params, author, tier, status
    actions: dict[int, dict] = field(default_factory=dict)  # id -> seq, proposal_id, kind, ..., state
    phase: tuple[int, int] | None = None  # (phase, seq) of the last applied or reverted set_phase

    def open_halt(self) -> tuple[int, dict] | None:
        """The newest halt the log shows as not lifted, or None."""
        open_ids = [hid for hid, h in self.halts.items() if h["resumed_at"] is None]
        return (max(open_ids), self.halts[max(open_ids)]) if open_ids else None

    def apply(self, row: AuditRow) -> None:
        """Replay one audit row."""
        self.seq, self.hash = row.seq, row.hash
        handler = _HANDLERS.get(row.event)
        if handler is not None:
            try:
                handler(self, row, json.loads(row.detail))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("audit row %d (%s) cannot be replayed: %r", row.seq, row.event, exc)

    def _halt(self, row: AuditRow, d: dict) -> None:
        self.halts[int(d["halt_id"])] = {"seq": row.seq, "reason": d["reason"], "halted_by": row.actor,
                                         "halted_at": row.ts, "resumed_at": None}
        for action_id in d.get("revert") or []:
            if action_id in self.actions:
                self.actions[action_id]["state"] = "revert_requested"

    def _resume_vote(self, row: AuditRow, d: dict) -> None:
        self.resume_votes[(int(d["halt_id"]), row.actor)] = {"seq": row.seq, "ts": row.ts}
        if row.event == "resumed" and int(d["halt_id"]) in self.halts:
            self.halts[int(d["halt_id"])]["resumed_at"] = row.ts

    def _vote(self, row: AuditRow, d: dict) -> None:
        self.votes[(int(d["proposal_id"]), row.actor)] = (d["choice"], row.seq)

    def _submitted(self, row: AuditRow, d: dict) -> None:
        self.proposals[int(d["proposal_id"])] = {"seq": row.seq, "kind": d["kind"], "target": d["target"],
                                                 "params": d["params"], "author": row.actor, "tier": d["tier"],
                                                 "status": "open", "sandbox": None}

    def _decided(self, row: AuditRow, d: dict) -> None:
        self._status(d.get("proposal_id"), row.event.removeprefix("proposal_"), row.seq)

    def _sandbox(self, row: AuditRow, d: dict) -> None:
        if int(d["proposal_id"]) in self.proposals:
            self.proposals[int(d["proposal_id"])]["sandbox"] = "passed" if d["passed"] else "failed"

    def _applied(self, row: AuditRow, d: dict) -> None:
        self.actions[int(d["action_id"])] = {"seq": row.seq, "proposal_id": d["proposal_id"], "kind": d["kind"],
                                             "target": d["target"], "params": d["params"], "inverse": d["inverse"],
                                             "applied_at": row.ts, "state": "applied"}
        self._status(d["proposal_id"], "applied", row.seq)
        if d["kind"] == PHASE_CHANGE_KIND:
            self.phase = (int(d["params"]["phase"]), row.seq)

    def _failed(self, row: AuditRow, d: dict) -> None:
        self._status(d.get("proposal_id"), "failed", row.seq)

    def _reverted(self, row: AuditRow, d: dict) -> None:
        state_ = row.event.removeprefix("action_")
        if int(d["action_id"]) in self.actions:
            self.actions[int(d["action_id"])]["state"] = state_
        if state_ == "reverted":
            self._status(d.get("proposal_id"), "reverted", row.seq)
            if d.get("kind") == PHASE_CHANGE_KIND:
                self.phase = (int(d["inverse"]["phase"]), row.seq)

    def _regression(self, row: AuditRow, d: dict) -> None:
        if d.get("automatic_rollback"):
            for action in self.actions.values():
                if action["proposal_id"] == d["proposal_id"] and action["state"] == "applied":
                    action["state"] = "revert_requested"

    def _status(self, proposal_id, status: str, seq: int) -> None:
        if proposal_id is not None and int(proposal_id) in self.proposals:
            self.proposals[int(proposal_id)].update(status=status, status_seq=seq)


_HANDLERS = {
    "halt": LogState._halt, "resume_vote": LogState._resume_vote, "resumed": LogState._resume_vote,
    "vote": LogState._vote, "proposal_submitted": LogState._submitted, "proposal_approved": LogState._decided,
    "proposal_accepted": LogState._decided, "proposal_rejected": LogState._decided,
    "sandbox_result": LogState._sandbox, "action_applied": LogState._applied, "action_failed": LogState._failed,
    "action_reverted": LogState._reverted, "action_revert_failed": LogState._reverted,
    "regression_reported": LogState._regression,
}


def advance(conn: Connection, log_state: LogState) -> LogState:
    """log_state with the rows appended since it was built; replayed from the start when the log was rewritten."""
    if log_state.seq:
        at = conn.execute(select(audit.c.hash).where(audit.c.seq == log_state.seq)).scalar()
        if at != log_state.hash:
            log.error("audit row %d changed or vanished since it was read: replaying the whole log", log_state.seq)
            log_state = LogState()
    for r in conn.execute(select(audit).where(audit.c.seq > log_state.seq).order_by(audit.c.seq)):
        log_state.apply(AuditRow(**r._mapping))
    return log_state


def replay(conn: Connection) -> LogState:
    """The state the whole audit log implies."""
    return advance(conn, LogState())


def cross_check(conn: Connection, log_state: LogState, *, initial_phase: int) -> list[Mismatch]:
    """Every place where halts, resume votes, votes, proposals, applied actions or the phase disagree with the log."""
    found: list[Mismatch] = []
    found += _check_halts(conn, log_state)
    found += _check_votes(conn, log_state)
    found += _check_proposals(conn, log_state)
    found += _check_actions(conn, log_state)
    stored = conn.execute(select(state.c.value).where(state.c.key == "phase")).scalar()
    logged, seq = log_state.phase if log_state.phase else (None, None)
    if stored is not None and int(stored) != (initial_phase if logged is None else logged):
        found.append(Mismatch(table="gov_state", seq=seq,
                              problem=f"phase is {stored} but the log's last set_phase gives "
                                      f"{initial_phase if logged is None else logged}"))
    return found


def _both_ways(table: str, stored: dict, logged: dict, label: str) -> list[Mismatch]:
    out = [Mismatch(table=table, seq=None, problem=f"{label} {key} is not in the audit log")
           for key in stored if key not in logged]
    out += [Mismatch(table=table, seq=entry["seq"], problem=f"{label} {key} of the audit log is missing")
            for key, entry in logged.items() if key not in stored]
    return out


def _check_halts(conn: Connection, log_state: LogState) -> list[Mismatch]:
    rows = {r.id: r for r in conn.execute(select(halts))}
    found = _both_ways("gov_halts", rows, log_state.halts, "halt")
    for hid, row in rows.items():
        want = log_state.halts.get(hid)
        if want is None:
            continue
        if (row.reason, row.halted_by, row.halted_at) != (want["reason"], want["halted_by"], want["halted_at"]):
            found.append(Mismatch(table="gov_halts", seq=want["seq"], problem=f"halt {hid} was edited"))
        if (row.resumed_at is None) != (want["resumed_at"] is None):
            lifted = "lifted" if row.resumed_at is not None else "not lifted"
            found.append(Mismatch(table="gov_halts", seq=want["seq"],
                                  problem=f"halt {hid} is {lifted} in the table but not in the audit log"))
    stored = {(r.halt_id, r.member): r for r in conn.execute(select(resume_votes))}
    found += _both_ways("gov_resume_votes", stored, log_state.resume_votes, "resume vote")
    return found


def _check_votes(conn: Connection, log_state: LogState) -> list[Mismatch]:
    stored = {(r.proposal_id, r.member): r.choice for r in conn.execute(select(votes))}
    logged = {key: {"seq": seq, "choice": choice} for key, (choice, seq) in log_state.votes.items()}
    found = _both_ways("gov_votes", stored, logged, "vote")
    found += [Mismatch(table="gov_votes", seq=logged[key]["seq"], problem=f"vote {key} changed its choice")
              for key, choice in stored.items() if key in logged and logged[key]["choice"] != choice]
    return found


def _check_proposals(conn: Connection, log_state: LogState) -> list[Mismatch]:
    rows = {r.id: r for r in conn.execute(select(proposals))}
    return _check_records("gov_proposals", "proposal", rows, log_state.proposals, state_col="status",
                          fields=("kind", "target", "params", "author", "tier", "sandbox"))


def _check_actions(conn: Connection, log_state: LogState) -> list[Mismatch]:
    rows = {r.id: r for r in conn.execute(select(actions))}
    return _check_records("gov_actions", "applied action", rows, log_state.actions, state_col="state",
                          fields=("proposal_id", "kind", "target", "params", "inverse", "applied_at"))


def _check_records(table: str, label: str, rows: dict, logged: dict, *, state_col: str,
                   fields: tuple[str, ...]) -> list[Mismatch]:
    """Rows against the log's records: both present, same fields (JSON columns parsed), same state."""
    found = _both_ways(table, rows, logged, label)
    for key, row in rows.items():
        want = logged.get(key)
        if want is None:
            continue
        have = [json.loads(getattr(row, f)) if f in ("params", "inverse") else getattr(row, f) for f in fields]
        if have != [want[f] for f in fields]:
            found.append(Mismatch(table=table, seq=want["seq"], problem=f"{label} {key} was edited"))
        state_now, state_logged = getattr(row, state_col), want[state_col]
        if state_now != state_logged and (state_logged, state_now) not in _IN_FLIGHT:
            found.append(Mismatch(table=table, seq=want.get("status_seq", want["seq"]),
                                  problem=f"{label} {key} is {state_now} in the table, {state_logged} in the log"))
    return found


def restore_open_halt(conn: Connection, log_state: LogState) -> dict | None:
    """Make gov_halts and its resume votes show the log's open halt (the log wins); return what was repaired."""
    found = log_state.open_halt()
    if found is None:
        return None
    hid, want = found
    row = conn.execute(select(halts).where(halts.c.id == hid)).first()
    values = {"reason": want["reason"], "halted_by": want["halted_by"], "halted_at": want["halted_at"],
              "resumed_at": None}
    if row is None:
        conn.execute(insert(halts).values(id=hid, **values))
        problem = "missing"
    elif row.resumed_at is not None or (row.reason, row.halted_by, row.halted_at) != (
            want["reason"], want["halted_by"], want["halted_at"]):
        conn.execute(update(halts).where(halts.c.id == hid).values(**values))
        problem = "lifted or edited without a logged resume"
    else:
        return None
    logged = {member: vote["ts"] for (h, member), vote in log_state.resume_votes.items() if h == hid}
    conn.execute(delete(resume_votes).where(resume_votes.c.halt_id == hid))
    for member, ts in sorted(logged.items()):
        conn.execute(insert(resume_votes).values(halt_id=hid, member=member, ts=ts))
    return {"table": "gov_halts", "halt_id": hid, "problem": problem, "halt_seq": want["seq"],
            "resume_votes": sorted(logged)}
