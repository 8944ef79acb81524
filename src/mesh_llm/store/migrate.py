"""Schema migrations: numbered modules in store/migrations applied in order with alembic operations."""

from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass
from types import ModuleType

from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Engine, Integer, MetaData, String, Table, insert, inspect, select

from mesh_llm.store import migrations as migrations_pkg
from mesh_llm.store.dialect import lock_for_writing

log = logging.getLogger(__name__)

_meta = MetaData()
schema_version = Table(
    "schema_version",
    _meta,
    Column("version", Integer, primary_key=True),
    Column("description", String(200), nullable=False),
)


@dataclass(frozen=True, kw_only=True)
class Migration:
    version: int  # strictly increasing schema version this migration produces
    description: str  # one line saying what it changes
    module: ModuleType  # module with upgrade(op: Operations)


def discover() -> list[Migration]:
    """All migrations shipped in mesh_llm.store.migrations, ordered by version."""
    found = []
    for info in pkgutil.iter_modules(migrations_pkg.__path__):
        if not info.name.startswith("v"):
            continue
        module = importlib.import_module(f"{migrations_pkg.__name__}.{info.name}")
        found.append(Migration(version=module.VERSION, description=module.DESCRIPTION, module=module))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


def current_version(engine: Engine) -> int:
    """Highest applied migration version (0 for an empty database)."""
    if not inspect(engine).has_table("schema_version"):
        return 0
    with engine.connect() as conn:
        versions = conn.execute(select(schema_version.c.version)).scalars().all()
    return max(versions, default=0)


def upgrade(engine: Engine) -> int:
    """Apply every migration newer than the database's version; return the final version."""
    pending = [m for m in discover() if m.version > current_version(engine)]
    if not pending:
        return current_version(engine)
    with engine.begin() as conn:  # one writer migrates; a process starting alongside waits, then finds it done
        lock_for_writing(conn, "schema migrations")
        _meta.create_all(conn, tables=[schema_version])
        applied = max(conn.execute(select(schema_version.c.version)).scalars().all(), default=0)
        op = Operations(MigrationContext.configure(conn))
        for migration in pending:
            if migration.version <= applied:
                continue
            migration.module.upgrade(op)
            conn.execute(insert(schema_version).values(version=migration.version, description=migration.description))
            log.info("applied schema migration %d: %s", migration.version, migration.description)
            applied = migration.version
    return applied
