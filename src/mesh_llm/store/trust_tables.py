"""SQLAlchemy Core table of the router's per-expert trust from spot checks (schema made by migration v005)."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, Float, Integer, MetaData, String, Table

metadata = MetaData()

# One row per expert ever spot-checked; expert_id is the registry's id (no foreign key: the registry
# table belongs to its own module and rows there are never deleted).
expert_trust = Table(
    "expert_trust",
    metadata,
    Column("expert_id", String(64), primary_key=True),
    Column("trust", Float, nullable=False),  # 0..1; scales the expert's mixing weight
    Column("checks", Integer, nullable=False),  # spot checks the expert took part in with a verdict
    Column("failed", Integer, nullable=False),  # of those, how many it failed
    Column("quarantined", Boolean, nullable=False),  # put out of selection by its trust falling below the threshold
    Column("last_failure", String(200), nullable=False),  # what the latest failed check measured
    Column("updated_at", Float, nullable=False),  # unix seconds of the latest change
)
