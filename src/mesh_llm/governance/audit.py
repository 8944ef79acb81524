"""Hash-chained audit log: append-only rows, each carrying the hash of the one before."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select

from mesh_llm.store.governance_tables import audit, state

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # prev_hash of the first row
_HEAD = "audit_head"  # gov_state key holding the last row's seq and hash (catches a deleted tail)


@dataclass(frozen=True, kw_only=True)
class AuditRow:
    seq: int  # position in the chain, 1, 2, 3, ...
    ts: float  # unix seconds
    event: str  # what happened: halt, vote, refused, action_applied, ...
    actor: str  # member, author or subsystem responsible
    detail: str  # canonical JSON object with the particulars
    prev_hash: str  # hash of the row before (GENESIS for the first)
    hash: str  # sha256 over prev_hash and this row's fields


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    ok: bool  # the whole chain checks out
    checked: int  # rows walked
    first_bad_seq: int | None  # the first row that does not check out (None when ok)
    problem: str  # what is wrong with it ("" when ok)


def row_hash(prev_hash: str, seq: int, ts: float, event: str, actor: str, detail: str) -> str:
    """sha256 hex of a row's content chained to the previous hash."""
    body = json.dumps([prev_hash, seq, ts, event, actor, detail], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def append(conn: Connection, *, ts: float, event: str, actor: str, detail: dict) -> int:
    """Add one row at the end of the chain inside the caller's write transaction; return its seq."""
    last = conn.execute(select(audit.c.seq, audit.c.hash).order_by(audit.c.seq.desc()).limit(1)).first()
    seq, prev = (last.seq + 1, last.hash) if last else (1, GENESIS)
    text = json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)
    digest = row_hash(prev, seq, ts, event, actor, text)
    conn.execute(insert(audit).values(seq=seq, ts=ts, event=event, actor=actor, detail=text,
                                      prev_hash=prev, hash=digest))
    head = json.dumps({"seq": seq, "hash": digest})
    if conn.execute(state.update().where(state.c.key == _HEAD).values(value=head)).rowcount == 0:
        conn.execute(insert(state).values(key=_HEAD, value=head))
    log.debug("audit %d %s by %s", seq, event, actor)
    return seq


def rows(conn: Connection, *, limit: int | None = None) -> list[AuditRow]:
    """The last `limit` rows (all when None), oldest first."""
    query = select(audit).order_by(audit.c.seq.desc())
    if limit is not None:
        query = query.limit(limit)
    return [AuditRow(**r._mapping) for r in reversed(conn.execute(query).all())]


def verify(conn: Connection) -> VerifyResult:
    """Walk the chain from the first row; name the first edited, deleted or reordered row."""
    prev, expected_seq, checked = GENESIS, 1, 0
    for r in conn.execute(select(audit).order_by(audit.c.seq)):
        checked += 1
        if r.seq != expected_seq:
            return VerifyResult(ok=False, checked=checked, first_bad_seq=r.seq,
                                problem=f"expected row {expected_seq} here: rows deleted or renumbered")
        if r.prev_hash != prev:
            return VerifyResult(ok=False, checked=checked, first_bad_seq=r.seq,
                                problem="prev_hash does not match the row before: rows deleted or reordered")
        if row_hash(r.prev_hash, r.seq, r.ts, r.event, r.actor, r.detail) != r.hash:
            return VerifyResult(ok=False, checked=checked, first_bad_seq=r.seq,
                                problem="content does not match its hash: row edited")
        prev, expected_seq = r.hash, expected_seq + 1
    head_text = conn.execute(select(state.c.value).where(state.c.key == _HEAD)).scalar()
    head = json.loads(head_text) if head_text else {"seq": 0, "hash": GENESIS}
    if head["seq"] != expected_seq - 1 or head["hash"] != prev:
        return VerifyResult(ok=False, checked=checked, first_bad_seq=expected_seq,
                            problem=f"chain ends at row {expected_seq - 1} but {head['seq']} rows were written: "
                                    "rows deleted from the end")
    return VerifyResult(ok=True, checked=checked, first_bad_seq=None, problem="")
