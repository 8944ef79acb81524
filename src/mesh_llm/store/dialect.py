"""The SQL the store writes that differs between SQLite and PostgreSQL, in one place.

Placeholders and quoting are SQLAlchemy's business; what is left is the driver a URL names,
engine options (SQLite pragmas), upserts (INSERT OR REPLACE / ON CONFLICT), insert-or-ignore
and a transaction-wide write lock (BEGIN IMMEDIATE on SQLite, an advisory lock on PostgreSQL).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from mesh_llm.errors import MeshError

POSTGRES_DRIVER = "postgresql+psycopg"
SUPPORTED = "sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE"


class UnsupportedStore(MeshError):
    """A store URL naming a database this project does not run on."""


def driver_url(url: str) -> str:
    """The URL with the driver this project uses (psycopg 3 for PostgreSQL); UnsupportedStore for others."""
    try:
        parsed = make_url(url)
    except Exception:
        raise UnsupportedStore(f"store URL {url!r} is not a database URL; use {SUPPORTED}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return url
    if backend in ("postgresql", "postgres"):
        return parsed.set(drivername=POSTGRES_DRIVER).render_as_string(hide_password=False)
    raise UnsupportedStore(f"store URL {parsed.render_as_string()!r} names {backend}; use {SUPPORTED}")


def new_engine(url: str) -> Engine:
    """An engine for a SQLite or PostgreSQL URL with this project's settings for each."""
    url = driver_url(url)
    if make_url(url).get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def is_postgres(bind: Engine | Connection) -> bool:
    """True when bind talks to PostgreSQL."""
    return bind.dialect.name == "postgresql"


def _insert(conn: Connection, table: Table):
    return (postgresql if is_postgres(conn) else sqlite).insert(table)


def upsert(conn: Connection, table: Table, values: Mapping, keys: Iterable[str], *,
           add: Iterable[str] = ()) -> None:
    """Insert values, or update the row with the same keys: columns in add grow by the new value, others are set."""
    keys, add = list(keys), set(add)
    statement = _insert(conn, table).values(**values)
    changes = {name: (table.c[name] + statement.excluded[name]) if name in add else statement.excluded[name]
               for name in values if name not in keys}
    conn.execute(statement.on_conflict_do_update(index_elements=keys, set_=changes) if changes
                 else statement.on_conflict_do_nothing(index_elements=keys))


def insert_ignore(conn: Connection, table: Table, values: Mapping, keys: Iterable[str]) -> bool:
    """Insert values unless a row with the same keys exists; True if a row was inserted."""
    keys = list(keys)
    statement = (_insert(conn, table).values(**values).on_conflict_do_nothing(index_elements=keys)
                 .returning(*(table.c[k] for k in keys)))
    return conn.execute(statement).first() is not None


def lock_for_writing(conn: Connection, name: str) -> None:
    """Hold a write lock named name until conn's transaction ends (call first in the transaction)."""
    if is_postgres(conn):
        key = zlib.crc32(name.encode())  # advisory locks take a number; the name keeps call sites readable
        conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({key})")
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
