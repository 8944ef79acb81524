"""Where mesh-llm keeps its files."""

from __future__ import annotations

import os
from pathlib import Path


def mesh_home() -> Path:
    """MESH_HOME, or ~/.mesh when unset; created on first use."""
    home = Path(os.environ.get("MESH_HOME") or Path.home() / ".mesh").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
