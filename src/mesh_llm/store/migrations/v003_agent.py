"""Migration 3: the agent_tasks table of the self-prompting agent."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.operations import Operations

VERSION = 3
DESCRIPTION = "agent tasks"


def upgrade(op: Operations) -> None:
    """Create agent_tasks (a frozen copy of store/agent_tables.py at version 3)."""
    op.create_table(
        "agent_tasks",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("kinds", sa.Text, nullable=False),
        sa.Column("source", sa.String(128), nullable=False),
        sa.Column("subset", sa.Integer, nullable=True),
        sa.Column("expert_ids", sa.Text, nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("context", sa.Text, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("raw_output", sa.Text, nullable=False),
        sa.Column("proposal", sa.Text, nullable=False),
        sa.Column("tier", sa.String(32), nullable=False),
        sa.Column("proposal_id", sa.Integer, nullable=True),
        sa.Column("baseline", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
    )
    op.create_index("ix_agent_tasks_state", "agent_tasks", ["state"])
