"""Logging set-up shared by the command-line entry points."""

from __future__ import annotations

import logging


def configure(verbose: bool = False) -> None:
    """Send log records to stderr once, at INFO (or DEBUG with verbose)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
