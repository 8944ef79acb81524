"""Migration 6: the credit ledger (tokens each expert contributed, per donor) and which donor runs each expert."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

VERSION = 6
DESCRIPTION = "credits: ledger per expert and donor, expert donors"


def upgrade(op: Operations) -> None:
    """Create credit_ledger and credit_donors (a frozen copy of store/credit_tables.py at version 6)."""
    op.create_table(
        "credit_ledger",
        sa.Column("expert_id", sa.String(64), nullable=False),
        sa.Column("donor", sa.String(64), nullable=False),
        sa.Column("tokens", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.PrimaryKeyConstraint("expert_id", "donor"),
    )
    op.create_index("ix_credit_ledger_donor", "credit_ledger", ["donor"])
    op.create_table(
        "credit_donors",
        sa.Column("expert_id", sa.String(64), primary_key=True),
        sa.Column("donor", sa.String(64), nullable=False),
        sa.Column("bound_at", sa.Float, nullable=False),
    )
