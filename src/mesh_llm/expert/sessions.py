"""Generation sessions: one KV cache each, bounded by count, bytes and idle time (least recently used goes first)."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SessionLimits:
    max_sessions: int = 64  # sessions held at once
    max_bytes: int = 2 << 30  # KV-cache bytes over all sessions
    idle_s: float = 300.0  # a session unused this long is dropped
    max_batch: int = 8  # concurrent sessions' steps run in one forward pass, at most this many (1 = one at a time)


@dataclass(kw_only=True)
class Session:
    session_id: str  # caller-chosen id
    cache: Any  # transformers Cache holding keys and values of `tokens`
    tokens: list[int] = field(default_factory=list)  # tokens the cache covers, in order
    last_used: float = 0.0  # monotonic time of the last step


class SessionStore:
    """Sessions keyed by id in least-recently-used order; not thread-safe (one engine thread owns it)."""

    def __init__(self, limits: SessionLimits, bytes_per_token: int, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.bytes_per_token = bytes_per_token
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        """The session, marked as just used, or None if unknown or evicted."""
        session = self._sessions.get(session_id)
        if session is not None:
            session.last_used = self.clock()
            self._sessions.move_to_end(session_id)
        return session

    def create(self, session_id: str, cache: Any, keep: Collection[str] = ()) -> Session:
        """A new empty session (replacing any of the same id), evicting others (never `keep`) over the count bound."""
        self._sessions.pop(session_id, None)
        session = Session(session_id=session_id, cache=cache, last_used=self.clock())
        self._sessions[session_id] = session
        self.enforce(keep={session_id, *keep})
        return session

    def drop(self, session_id: str) -> bool:
        """Forget a session; True if it existed."""
        return self._sessions.pop(session_id, None) is not None

    def total_bytes(self) -> int:
        """KV-cache bytes held by all sessions."""
        return sum(len(s.tokens) for s in self._sessions.values()) * self.bytes_per_token

    def fits(self, extra_tokens: int) -> bool:
        """Whether one session of extra_tokens tokens could ever fit the byte budget."""
        return extra_tokens * self.bytes_per_token <= self.limits.max_bytes

    def enforce(self, keep: Collection[str] = (), extra_tokens: int = 0) -> list[str]:
        """Evict idle sessions, then least recently used ones over the bounds, never those in keep; the evicted ids."""
        keep = set(keep)
        now = self.clock()
        evicted = [sid for sid, s in self._sessions.items()
                   if sid not in keep and now - s.last_used > self.limits.idle_s]
        for sid in evicted:
            del self._sessions[sid]
        budget = self.limits.max_bytes - extra_tokens * self.bytes_per_token
        while len(self._sessions) > self.limits.max_sessions or self.total_bytes() > budget:
            victim = next((sid for sid in self._sessions if sid not in keep), None)
            if victim is None:
                break
            del self._sessions[victim]
            evicted.append(victim)
        if evicted:
            self.evictions += len(evicted)
            log.info("evicted %d session(s): %s", len(evicted), ", ".join(evicted[:5]))
        return evicted
