"""Engine creation and the default database location."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine, create_engine, event

from mesh_llm.paths import mesh_home

log = logging.getLogger(__name__)


def default_db_url() -> str:
    """SQLite file under MESH_HOME used when no --db is given."""
    return f"sqlite:///{mesh_home() / 'mesh.db'}"


def open_engine(url: str | None = None, *, migrate: bool = True) -> Engine:
    """Open an engine for any SQLAlchemy URL and bring its schema up to date."""
    url = url or default_db_url()
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(url, pool_pre_ping=True)
    if migrate:
        from mesh_llm.store.migrate import upgrade

        upgrade(engine)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
