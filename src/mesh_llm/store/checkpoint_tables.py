"""SQLAlchemy Core table of generation checkpoints (schema made by migration v007_checkpoints)."""

from __future__ import annotations

from sqlalchemy import Column, Float, Integer, LargeBinary, MetaData, String, Table, Text

metadata = MetaData()

# the latest checkpoint of each generation; times are unix seconds
checkpoints = Table(
    "generation_checkpoints",
    metadata,
    Column("generation_id", String(64), primary_key=True),
    Column("request", LargeBinary, nullable=False),  # the GenerateRequest as sent (serialised protobuf)
    Column("state", Text, nullable=False),  # JSON: tokens so far, sampler and selection RNG states, experts
    Column("tokens", Integer, nullable=False),  # completion tokens the checkpoint holds
    Column("finish_reason", String(16), nullable=False),  # "" while resumable, else how it ended
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)
