"""SQLAlchemy Core table of the router's expert registry (schema made by migrations v001 and v004)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table

metadata = MetaData()

# Times are unix seconds (float) from the registry's clock.
experts = Table(
    "experts",
    metadata,
    Column("expert_id", String(64), primary_key=True),
    Column("name", String(200), nullable=False, default=""),
    Column("address", String(255), nullable=False, unique=True),
    Column("model_id", String(500), nullable=False),
    Column("tokenizer_fingerprint", String(128), nullable=False, index=True),
    Column("vocab_size", Integer, nullable=False),
    Column("context_limit", Integer, nullable=False),
    Column("device", String(64), nullable=False),
    Column("quantization", String(64), nullable=False),
    Column("dtype", String(32), nullable=False),
    Column("max_top_k", Integer, nullable=False),
    Column("max_sessions", Integer, nullable=False),
    Column("eos_token_ids", String(500), nullable=False),
    Column("expert_version", String(64), nullable=False),
    Column("tokens_per_second", Float, nullable=False),
    Column("weight", Float, nullable=False),
    Column("rtt_ms", Float, nullable=True),
    Column("failures", Integer, nullable=False),
    Column("last_failure", String(200), nullable=False),
    Column("tokens_served", BigInteger, nullable=False),
    Column("active_sessions", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("registered_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("identity", String(64), nullable=False, default="", index=True),  # registrant's key, as an HMAC
)
