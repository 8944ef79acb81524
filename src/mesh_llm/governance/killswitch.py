"""The kill switch: one in-process halt flag with listeners and awaitable waits, plus its stored state."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, select

from mesh_llm.governance.errors import MeshHalted
from mesh_llm.store.governance_tables import halts, resume_votes

log = logging.getLogger(__name__)

Listener = Callable[[bool, str], None]  # (halted, reason)


@dataclass(frozen=True, kw_only=True)
class HaltState:
    halted: bool  # the mesh is halted and read-only
    halt_id: int | None  # id of the current (or, when not halted, None) halt
    reason: str  # reason given by the member who halted
    halted_by: str  # member who halted
    halted_at: float | None  # unix seconds of the halt
    resume_votes: tuple[str, ...]  # members who have signed a resume for this halt
    resume_required: int  # resume votes that lift it


class HaltSwitch:
    """The one halt flag every entry point checks; only Governance sets or clears it."""

    def __init__(self) -> None:
        """Start not halted with no listeners."""
        self._halted = False
        self._reason = ""
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    @property
    def is_halted(self) -> bool:
        """True while the mesh is halted."""
        return self._halted

    @property
    def reason(self) -> str:
        """Reason of the current halt ('' when running)."""
        return self._reason

    def check(self) -> None:
        """Raise MeshHalted when halted; call at every entry point (generation, agent task, apply)."""
        if self._halted:
            raise MeshHalted(f"the mesh is halted: {self._reason}; only a quorum of signed resume votes lifts it")

    def add_listener(self, callback: Listener) -> Callable[[], None]:
        """Call callback(halted, reason) synchronously on every change; return a function that removes it."""
        with self._lock:
            self._listeners.append(callback)

        def remove() -> None:
            """Stop calling callback."""
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return remove

    async def wait_halted(self) -> str:
        """Return the reason as soon as the mesh is halted (immediately if it already is)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._halted:
                return self._reason
            future = loop.create_future()
            self._waiters.append((loop, future))
        try:
            return await future
        finally:
            with self._lock:
                if (loop, future) in self._waiters:
                    self._waiters.remove((loop, future))

    def _set(self, halted: bool, reason: str) -> None:
        """Change the flag and notify listeners and waiters (Governance only)."""
        with self._lock:
            if halted == self._halted:
                return
            self._halted, self._reason = halted, reason if halted else ""
            listeners = list(self._listeners)
            waiters, self._waiters = (self._waiters, []) if halted else ([], self._waiters)
        log.warning("mesh %s%s", "HALTED" if halted else "resumed", f": {reason}" if halted else "")
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future, reason)
        for callback in listeners:
            try:
                callback(halted, reason)
            except Exception:
                log.exception("halt listener %r failed", callback)


def _resolve(future: asyncio.Future, reason: str) -> None:
    if not future.done():
        future.set_result(reason)


def current_halt(conn: Connection):
    """The stored halt that has not been lifted, or None."""
    return conn.execute(select(halts).where(halts.c.resumed_at.is_(None)).order_by(halts.c.id.desc())).first()


def load_state(conn: Connection, resume_required: int) -> HaltState:
    """Halt state as stored."""
    row = current_halt(conn)
    if row is None:
        return HaltState(halted=False, halt_id=None, reason="", halted_by="", halted_at=None,
                         resume_votes=(), resume_required=resume_required)
    voters = conn.execute(select(resume_votes.c.member).where(resume_votes.c.halt_id == row.id)
                          .order_by(resume_votes.c.ts)).scalars().all()
    return HaltState(halted=True, halt_id=row.id, reason=row.reason, halted_by=row.halted_by,
                     halted_at=row.halted_at, resume_votes=tuple(voters), resume_required=resume_required)


class HaltPayload(BaseModel):
    """Payload of a signed halt."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["halt"]
    reason: str = Field(min_length=1, max_length=2000)


class ResumePayload(BaseModel):
    """Payload of a signed resume vote (halt_id, when given, must name the current halt)."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["resume"]
    halt_id: int | None = None
