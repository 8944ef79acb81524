"""SQLAlchemy Core tables of the governance subsystem (created by migration v002_governance)."""

from __future__ import annotations

from sqlalchemy import Column, Float, ForeignKey, Integer, MetaData, PrimaryKeyConstraint, String, Table, Text

metadata = MetaData()

# hash-chained, append-only audit log: every event, applied action and refusal
audit = Table(
    "gov_audit",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("ts", Float, nullable=False),
    Column("event", String(64), nullable=False),
    Column("actor", String(128), nullable=False),
    Column("detail", Text, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False, unique=True),
)

# nonces of accepted signed messages, to refuse replays
nonces = Table(
    "gov_nonces",
    metadata,
    Column("signer", String(64), nullable=False),
    Column("nonce", String(128), nullable=False),
    Column("ts", Float, nullable=False),
    PrimaryKeyConstraint("signer", "nonce"),
)

proposals = Table(
    "gov_proposals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(64), nullable=False),
    Column("target", String(256), nullable=False),
    Column("params", Text, nullable=False),
    Column("rationale", Text, nullable=False),
    Column("author", String(128), nullable=False),
    Column("tier", String(32), nullable=False),
    Column("tier_reason", Text, nullable=False),
    Column("phase", Integer, nullable=False),
    Column("status", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("eligible_at", Float, nullable=False),
    Column("decided_at", Float, nullable=True),
    Column("sandbox", String(16), nullable=True),
)

votes = Table(
    "gov_votes",
    metadata,
    Column("proposal_id", Integer, ForeignKey("gov_proposals.id"), nullable=False),
    Column("member", String(64), nullable=False),
    Column("choice", String(16), nullable=False),
    Column("ts", Float, nullable=False),
    PrimaryKeyConstraint("proposal_id", "member"),
)

# applied actions with the parameters that undo them
actions = Table(
    "gov_actions",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("proposal_id", Integer, ForeignKey("gov_proposals.id"), nullable=True),
    Column("kind", String(64), nullable=False),
    Column("target", String(256), nullable=False),
    Column("params", Text, nullable=False),
    Column("inverse", Text, nullable=False),
    Column("applied_at", Float, nullable=False),
    Column("state", String(32), nullable=False),
    Column("halt_id", Integer, nullable=True),
    Column("reverted_at", Float, nullable=True),
)

halts = Table(
    "gov_halts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("reason", Text, nullable=False),
    Column("halted_by", String(64), nullable=False),
    Column("halted_at", Float, nullable=False),
    Column("resumed_at", Float, nullable=True),
)

resume_votes = Table(
    "gov_resume_votes",
    metadata,
    Column("halt_id", Integer, ForeignKey("gov_halts.id"), nullable=False),
    Column("member", String(64), nullable=False),
    Column("ts", Float, nullable=False),
    PrimaryKeyConstraint("halt_id", "member"),
)

# small key/value facts: current phase, audit chain head
state = Table(
    "gov_state",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
