"""Migration 5: the expert_trust table of the router's spot checks."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

VERSION = 5
DESCRIPTION = "per-expert trust from spot checks"


def upgrade(op: Operations) -> None:
    """Create expert_trust (a frozen copy of store/trust_tables.py at version 5)."""
    op.create_table(
        "expert_trust",
        sa.Column("expert_id", sa.String(64), primary_key=True),
        sa.Column("trust", sa.Float, nullable=False),
        sa.Column("checks", sa.Integer, nullable=False),
        sa.Column("failed", sa.Integer, nullable=False),
        sa.Column("quarantined", sa.Boolean, nullable=False),
        sa.Column("last_failure", sa.String(200), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
