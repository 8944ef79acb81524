"""SQLAlchemy Core tables of the credit ledger (schema made by migration v006_credits)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, MetaData, PrimaryKeyConstraint, String, Table

metadata = MetaData()

# tokens each expert contributed to mixtures, credited to the donor that runs it; times are unix seconds
ledger = Table(
    "credit_ledger",
    metadata,
    Column("expert_id", String(64), nullable=False),
    Column("donor", String(64), nullable=False, index=True),  # donor identity ("" for an expert with no key)
    Column("tokens", BigInteger, nullable=False),  # credits earned: one per token mixed into an output
    Column("updated_at", Float, nullable=False),
    PrimaryKeyConstraint("expert_id", "donor"),
)

# the donor an expert was last registered by, so credits go to it after a router restart too
donors = Table(
    "credit_donors",
    metadata,
    Column("expert_id", String(64), primary_key=True),
    Column("donor", String(64), nullable=False),
    Column("bound_at", Float, nullable=False),
)
