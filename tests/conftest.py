"""Shared fixtures: MESH_HOME in a temp folder and tiny random Llama checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_llm.models.tiny import build_tiny_llama


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
