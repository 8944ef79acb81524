"""Turning library errors into one clear line and an exit code."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from mesh_llm.errors import MeshError


@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Print MeshError messages to stderr and exit 1 instead of showing a traceback."""
    try:
        yield
    except MeshError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
