"""Migration 1: the experts table of the router registry."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

VERSION = 1
DESCRIPTION = "experts registry table"


def upgrade(op: Operations) -> None:
    """Create the experts table (a frozen copy of its columns as of this version)."""
    op.create_table(
        "experts",
        sa.Column("expert_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("address", sa.String(255), nullable=False, unique=True),
        sa.Column("model_id", sa.String(500), nullable=False),
        sa.Column("tokenizer_fingerprint", sa.String(128), nullable=False),
        sa.Column("vocab_size", sa.Integer, nullable=False),
        sa.Column("context_limit", sa.Integer, nullable=False),
        sa.Column("device", sa.String(64), nullable=False),
        sa.Column("quantization", sa.String(64), nullable=False),
        sa.Column("dtype", sa.String(32), nullable=False),
        sa.Column("max_top_k", sa.Integer, nullable=False),
        sa.Column("max_sessions", sa.Integer, nullable=False),
        sa.Column("eos_token_ids", sa.String(500), nullable=False),
        sa.Column("expert_version", sa.String(64), nullable=False),
        sa.Column("tokens_per_second", sa.Float, nullable=False),
        sa.Column("weight", sa.Float, nullable=False),
        sa.Column("rtt_ms", sa.Float, nullable=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_failure", sa.String(200), nullable=False),
        sa.Column("tokens_served", sa.BigInteger, nullable=False),
        sa.Column("active_sessions", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("registered_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
    )
    op.create_index("ix_experts_tokenizer_fingerprint", "experts", ["tokenizer_fingerprint"])
