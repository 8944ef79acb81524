"""Hash-chained audit log: append-only rows, each carrying the hash of the one before.

The chain head (last seq and hash) is kept in gov_state with an HMAC under a key that lives outside
the database (MESH_HOME/audit_key, 0600, made on first use): whoever can rewrite the tables but not
read that file cannot recompute a chain that verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, insert, select

from mesh_llm.governance.errors import KeyStoreError
from mesh_llm.governance.keys import require_private
from mesh_llm.paths import mesh_home
from mesh_llm.store.governance_tables import audit, state

log = logging.getLogger(__name__)

GENESIS = "0" * 64  # prev_hash of the first row
_HEAD = "audit_head"  # gov_state key holding the last row's seq and hash (catches a deleted tail)
AUDIT_KEY_FILE = "audit_key"  # under MESH_HOME: the secret that signs the chain head
_HEAD_DOMAIN = b"mesh-llm audit head v1\n"


def audit_key_path() -> Path:
    """MESH_HOME/audit_key, the key that signs the chain head."""
    return mesh_home() / AUDIT_KEY_FILE


def load_audit_key(*, create: bool) -> bytes | None:
    """The head-signing key (made, 0600, when create and missing; None when missing); refuse a readable file."""
    path = audit_key_path()
    if not path.exists():
        if not create:
            return None
        staged = path.with_name(f".{path.name}.{os.getpid()}")  # written whole, then linked in: no half-made key
        with os.fdopen(os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            os.link(staged, path)
            log.info("made the audit head key %s", path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            staged.unlink()
    require_private(path)
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) < 32:
        raise KeyStoreError(f"{path} is not an audit key (64 hex characters); restore it from a backup or, "
                            "for a new store only, delete it to make a new one")
    return key


def head_mac(key: bytes, seq: int, digest: str) -> str:
    """HMAC-SHA256 hex of the chain head (seq and hash) under the audit key."""
    return hmac.new(key, _HEAD_DOMAIN + f"{seq}:{digest}".encode(), hashlib.sha256).hexdigest()


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
    mismatches: tuple[str, ...] = ()  # where the state tables disagree with the log, one line each


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
    head = json.dumps({"seq": seq, "hash": digest, "mac": head_mac(load_audit_key(create=True), seq, digest)})
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
    problem = _head_problem(head) if checked else ""
    if problem:
        return VerifyResult(ok=False, checked=checked, first_bad_seq=head["seq"], problem=problem)
    return VerifyResult(ok=True, checked=checked, first_bad_seq=None, problem="")


def _head_problem(head: dict) -> str:
    """Why the stored head's signature does not check out ('' when it does)."""
    path = audit_key_path()
    if "mac" not in head:
        return ("the chain head carries no signature: it was rewritten, or written before heads were signed "
                "(the next governance event signs it)")
    key = load_audit_key(create=False)
    if key is None:
        return (f"no audit key at {path}: the head was signed by a process with another MESH_HOME; copy that "
                "MESH_HOME's audit_key here (0600) to verify")
    if not hmac.compare_digest(head["mac"], head_mac(key, head["seq"], head["hash"])):
        return (f"the chain head's signature does not match {path}: rows were rewritten and their hashes "
                "recomputed (or the store was written with another MESH_HOME's key)")
    return ""
