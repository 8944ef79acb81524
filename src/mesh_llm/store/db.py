"""Engine creation and the default database location."""

from __future__ import annotations

import logging
import os

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from mesh_llm.errors import MeshError
from mesh_llm.paths import mesh_home
from mesh_llm.store.dialect import new_engine

log = logging.getLogger(__name__)
STORE_ENV = "MESH_STORE"  # store URL used when a command is given no --db


class StoreUnavailable(MeshError):
    """The store's database server could not be reached or refused the connection."""


def default_db_url() -> str:
    """$MESH_STORE when set, else the SQLite file under MESH_HOME; used when no --db is given."""
    return os.environ.get(STORE_ENV, "").strip() or f"sqlite:///{mesh_home() / 'mesh.db'}"


def open_engine(url: str | None = None, *, migrate: bool = True) -> Engine:
    """Open an engine for a SQLite or PostgreSQL URL and bring its schema up to date."""
    engine = new_engine(url or default_db_url())
    if migrate:
        from mesh_llm.store.migrate import upgrade

        try:
            upgrade(engine)
        except OperationalError as exc:
            engine.dispose()
            where = engine.url.render_as_string(hide_password=True)
            raise StoreUnavailable(f"cannot open the store {where}: {exc.orig}; start the database server or "
                                   f"pass another --db (or {STORE_ENV})") from None
    return engine
