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


def applied_versions(engine: Engine) -> set[int]:
    """Versions of the migrations applied to the database (empty for an empty database)."""
    if not inspect(engine).has_table("schema_version"):
        return set()
    with engine.connect() as conn:
        return set(conn.execute(select(schema_version.c.version)).scalars().all())


def current_version(engine: Engine) -> int:
    """Highest applied migration version (0 for an empty database)."""
    return max(applied_versions(engine), default=0)


def upgrade(engine: Engine) -> int:
    """Apply every shipped migration the database lacks, in version order; return the highest version.

    A migration numbered below one already applied (two added on different branches) is applied too.
    """
    done = applied_versions(engine)
    if all(m.version in done for m in discover()):
        return max(done, default=0)
    with engine.begin() as conn:  # one writer migrates; a process starting alongside waits, then finds it done
        lock_for_writing(conn, "schema migrations")
        _meta.create_all(conn, tables=[schema_version])
        done = set(conn.execute(select(schema_version.c.version)).scalars().all())
        op = Operations(MigrationContext.configure(conn))
        for migration in discover():
            if migration.version in done:
                continue
            migration.module.upgrade(op)
            conn.execute(insert(schema_version).values(version=migration.version, description=migration.description))
            log.info("applied schema migration %d: %s", migration.version, migration.description)
            done.add(migration.version)
    return max(done)
