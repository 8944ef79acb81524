"""Write transactions that serialise governance writers across processes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from sqlalchemy import Connection, Engine

from mesh_llm.store.dialect import lock_for_writing


@contextlib.contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """A transaction holding the governance write lock from its start (SQLite BEGIN IMMEDIATE, PostgreSQL advisory)."""
    with engine.begin() as conn:
        lock_for_writing(conn, "governance")
        yield conn
