"""Governance tables: audit chain, nonces, proposals, votes, applied actions, halts, state."""

from __future__ import annotations

import sqlalchemy as sa

VERSION = 2
DESCRIPTION = "governance: audit chain, nonces, proposals, votes, actions, halts, state"


def upgrade(op) -> None:
    """Create the gov_* tables (frozen copy of store/governance_tables.py at version 2)."""
    op.create_table(
        "gov_audit",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False, unique=True),
    )
    op.create_table(
        "gov_nonces",
        sa.Column("signer", sa.String(64), nullable=False),
        sa.Column("nonce", sa.String(128), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("signer", "nonce"),
    )
    op.create_table(
        "gov_proposals",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("rationale", sa.Text, nullable=False),
        sa.Column("author", sa.String(128), nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("tier_reason", sa.Text, nullable=False),
        sa.Column("phase", sa.Integer, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("eligible_at", sa.Float, nullable=False),
        sa.Column("decided_at", sa.Float, nullable=True),
        sa.Column("sandbox", sa.String(16), nullable=True),
    )
    op.create_table(
        "gov_votes",
        sa.Column("proposal_id", sa.Integer, sa.ForeignKey("gov_proposals.id"), nullable=False),
        sa.Column("member", sa.String(64), nullable=False),
        sa.Column("choice", sa.String(16), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("proposal_id", "member"),
    )
    op.create_table(
        "gov_actions",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("proposal_id", sa.Integer, sa.ForeignKey("gov_proposals.id"), nullable=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("inverse", sa.Text, nullable=False),
        sa.Column("applied_at", sa.Float, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("halt_id", sa.Integer, nullable=True),
        sa.Column("reverted_at", sa.Float, nullable=True),
    )
    op.create_table(
        "gov_halts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("halted_by", sa.String(64), nullable=False),
        sa.Column("halted_at", sa.Float, nullable=False),
        sa.Column("resumed_at", sa.Float, nullable=True),
    )
    op.create_table(
        "gov_resume_votes",
        sa.Column("halt_id", sa.Integer, sa.ForeignKey("gov_halts.id"), nullable=False),
        sa.Column("member", sa.String(64), nullable=False),
        sa.Column("ts", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("halt_id", "member"),
    )
    op.create_table(
        "gov_state",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
