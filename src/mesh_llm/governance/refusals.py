"""Unauthenticated refusals counted per window: one grouped audit row with counts, never the caller's text.

Anyone can send a message signed by an unknown key, with a bad signature, a stale timestamp, a
replayed nonce, or no signature at all. Writing one audit row per such call (with the name and
text the caller chose) lets a stranger flood the log and the agent's prompt; instead the refusals
of one window are counted by operation and reason and written as a single row when it closes.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

log = logging.getLogger(__name__)

EVENT = "refused_unauthenticated"  # audit event of one window's grouped refusals


class RefusalDigest:
    """Counts unauthenticated refusals by (operation, reason) until the window closes."""

    def __init__(self, *, window_s: float, clock: Callable[[], float]) -> None:
        """Group refusals into windows of window_s seconds of clock."""
        self.window_s = window_s
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._since: float | None = None
        self._last: float | None = None

    def add(self, op: str, reason: str) -> None:
        """Count one refusal of op (halt, resume, vote, propose) for reason (an error class name)."""
        now = self.clock()
        with self._lock:
            if self._since is None:
                self._since = now
            key = f"{op}:{reason}"
            self._counts[key] += 1
            self._last = now
            first = self._counts[key] == 1
        if first:  # one log line per kind and window; the rest are counted
            log.warning("refused unauthenticated %s (%s); further ones this window are only counted", op, reason)

    def due(self) -> bool:
        """Whether a window with refusals has closed."""
        with self._lock:
            return self._since is not None and self.clock() - self._since >= self.window_s

    def take(self, *, force: bool = False) -> dict | None:
        """The closed window's audit detail (any open window's with force), and start a new one; None when empty."""
        with self._lock:
            if self._since is None or (not force and self.clock() - self._since < self.window_s):
                return None
            counts, since, last = dict(sorted(self._counts.items())), self._since, self._last
            self._counts, self._since, self._last = Counter(), None, None
        return {"count": sum(counts.values()), "by": counts, "first_at": since, "last_at": last,
                "window_s": self.window_s}
