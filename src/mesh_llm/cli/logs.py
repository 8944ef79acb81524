"""Logging set-up shared by the command-line entry points."""

from __future__ import annotations

import logging

SERVICE_COMMANDS = frozenset({"router", "demo"})  # long-running `mesh` commands whose log is part of their output
NOISY = ("httpx", "urllib3", "filelock", "alembic")

_handler: logging.Handler | None = None  # the handler configure() put on the root logger


def configure(verbose: bool = False, *, quiet: bool = False, level: int = logging.INFO) -> None:
    """Log to stderr at level (DEBUG with verbose); quiet logs nothing unless verbose."""
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
        _handler = None
    if quiet and not verbose:
        _handler = logging.NullHandler()  # also keeps Python's last-resort handler from printing warnings
        root.addHandler(_handler)
        return
    root.setLevel(logging.DEBUG if verbose else level)
    if not root.handlers:  # otherwise the embedding program (a test runner, say) owns the output
        _handler = logging.StreamHandler()
        _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(_handler)
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def show_warnings() -> None:
    """Log warnings to stderr even where configure() was quiet (commands that run for a long time)."""
    if isinstance(_handler, logging.NullHandler):
        configure(level=logging.WARNING)
