"""Shared fixtures: MESH_HOME in a temp folder and tiny random Llama checkpoints."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from mesh_llm.testing.tiny_model import build_tiny_llama


@pytest.fixture(autouse=True)
def mesh_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own MESH_HOME unless it is a slow test using the shared model cache."""
    home = tmp_path / "mesh_home"
    monkeypatch.setenv("MESH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint folder (seed 0)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny0"), seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir_b(tmp_path_factory) -> Path:
    """A second tiny Llama with the same tokenizer but different weights (seed 1)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny1"), seed=1)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """The seed-0 tiny model loaded through the real loading path, float32 on CPU."""
    from mesh_llm.models.loading import LoadOptions, load

    return load(LoadOptions(model=str(tiny_model_dir), device="cpu"))


POSTGRES_ENV = "MESH_TEST_POSTGRES_URL"
POSTGRES_HOW = ("PostgreSQL not reachable: apt-get install postgresql && pg_ctlcluster 15 main start, create a user "
                f"and database and export {POSTGRES_ENV}=postgresql://USER:PASSWORD@127.0.0.1:5432/DB (.ci/run does)")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A fresh, empty store: a SQLite file, then a schema of its own in $MESH_TEST_POSTGRES_URL's database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    from sqlalchemy import text

    from mesh_llm.store.dialect import new_engine

    base = os.environ.get(POSTGRES_ENV, "")
    if not base:
        pytest.skip(POSTGRES_HOW)
    admin = new_engine(base)
    schema = f"t_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:
        admin.dispose()
        pytest.skip(f"{POSTGRES_HOW} ({type(exc).__name__})")
    try:
        yield f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text("SET LOCAL lock_timeout = '10s'"))
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()
