"""SQLAlchemy Core table of the self-prompting agent's tasks (schema made by migration v003_agent)."""

from __future__ import annotations

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text

metadata = MetaData()

# One row per agent task; JSON columns are canonical JSON text. Times are unix seconds.
agent_tasks = Table(
    "agent_tasks",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("type", String(64), nullable=False),  # task type, e.g. config_tuning
    Column("kinds", Text, nullable=False),  # JSON list: action kinds this task may propose
    Column("source", String(128), nullable=False),  # who queued it: cli, grpc peer, runner
    Column("subset", Integer, nullable=True),  # subset index of the runner that ran it
    Column("expert_ids", Text, nullable=False),  # JSON list: experts its generation was limited to
    Column("state", String(32), nullable=False, index=True),  # queued, running, awaiting_votes, ...
    Column("context", Text, nullable=False),  # text the submitter attached (bounded)
    Column("prompt", Text, nullable=False),  # prompt sent through the router
    Column("raw_output", Text, nullable=False),  # text the mesh generated
    Column("proposal", Text, nullable=False),  # JSON object parsed from the output ("" when none)
    Column("tier", String(32), nullable=False),  # governance tier of the proposal
    Column("proposal_id", Integer, nullable=True),  # governance proposal id once submitted
    Column("baseline", Text, nullable=False),  # JSON: metric measured at proposal time
    Column("outcome", Text, nullable=False),  # what came of it, for people
    Column("error", Text, nullable=False),  # why it failed, was refused or interrupted
    Column("attempts", Integer, nullable=False),  # times it was started
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
)
