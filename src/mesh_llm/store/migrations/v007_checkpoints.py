"""Migration 7: checkpoints of running generations, so a restarted router can resume them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

VERSION = 7
DESCRIPTION = "generation checkpoints"


def upgrade(op: Operations) -> None:
    """Create generation_checkpoints (a frozen copy of store/checkpoint_tables.py at version 7)."""
    op.create_table(
        "generation_checkpoints",
        sa.Column("generation_id", sa.String(64), primary_key=True),
        sa.Column("request", sa.LargeBinary, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("tokens", sa.Integer, nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
