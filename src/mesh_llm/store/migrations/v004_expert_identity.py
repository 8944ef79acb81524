"""Migration 4: the registrant identity of each expert row (one row per donor key and name)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

VERSION = 4
DESCRIPTION = "expert identity"


def upgrade(op: Operations) -> None:
    """Add experts.identity (rows from before it stay unbound: identity '') and its index."""
    op.add_column("experts", sa.Column("identity", sa.String(64), nullable=False, server_default=""))
    op.create_index("ix_experts_identity", "experts", ["identity"])
