"""Shared set-up for `slow` tests on the real default model (kept in one model cache across runs)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest


def real_home() -> Path:
    """MESH_HOME used by slow tests: MESH_TEST_HOME, else ~/.mesh (the model is pulled once there)."""
    return Path(os.environ.get("MESH_TEST_HOME") or Path.home() / ".mesh")


@pytest.fixture
def real_mesh_home(monkeypatch) -> Path:
    """Point MESH_HOME at the shared cache and make sure the default model is pulled and converted."""
    from mesh_llm.models.catalog import DEFAULT_MODEL, resolve
    from mesh_llm.models.fetch import pull
    from mesh_llm.models.loading import checkpoint_for

    home = real_home()
    monkeypatch.setenv("MESH_HOME", str(home))
    entry = resolve(DEFAULT_MODEL)
    pull(entry)
    checkpoint_for(entry)
    return home


def free_port() -> int:
    """A port that was free a moment ago on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
