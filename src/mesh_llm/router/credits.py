"""Cooperative credits: every token an expert contributes to a mixture earns its donor one credit.

The ledger keeps one row per (expert, donor) in the store. Tokens are counted in memory on the
per-token path and written in one transaction at each generation checkpoint and at its end, so a
ledger read after a generation finished equals the tokens it served. When the router is busy
(as many generations running as `max_active` allows), new Generate calls wait for a slot; with
`by_credits` the waiting client whose donor has the most credits goes first, else the first to come.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from sqlalchemy import Engine, func, select

from mesh_llm.store.credit_tables import donors, ledger
from mesh_llm.store.dialect import upsert


@dataclass(frozen=True, kw_only=True)
class CreditPolicy:
    max_active: int = 0  # generations run at once before new ones wait (0 = never busy)
    by_credits: bool = False  # when busy, serve waiting clients with the most donor credits first


@dataclass(frozen=True, kw_only=True)
class LedgerRow:
    donor: str  # donor identity ("" for experts registered without a key)
    expert_id: str  # the expert that earned them
    tokens: int  # credits: tokens it contributed to mixtures


class CreditLedger:
    """Credits per (expert, donor) in the store, with the tokens not yet written held in memory."""

    def __init__(self, engine: Engine) -> None:
        """Read which donor runs each known expert from the store."""
        self.engine = engine
        self._lock = threading.Lock()
        self._pending: Counter[tuple[str, str]] = Counter()
        self._writing: Counter[tuple[str, str]] = Counter()  # being written: still shown as pending
        self._written = 0  # flushes finished; a reader that saw it change re-reads
        with engine.connect() as conn:
            self._donors = {r.expert_id: r.donor for r in conn.execute(select(donors))}

    def bind(self, expert_id: str, donor: str) -> None:
        """Credit expert_id's future tokens to donor (its registrant's identity)."""
        if self._donors.get(expert_id) == donor:
            return
        with self.engine.begin() as conn:
            upsert(conn, donors, {"expert_id": expert_id, "donor": donor, "bound_at": time.time()}, ["expert_id"])
        self._donors[expert_id] = donor

    def earn(self, expert_ids: Iterable[str], tokens: int) -> None:
        """Each of these experts contributed `tokens` tokens to the mixture (kept in memory until flush)."""
        with self._lock:
            for expert_id in expert_ids:
                self._pending[(expert_id, self._donors.get(expert_id, ""))] += tokens

    def flush(self) -> int:
        """Write the credits held in memory in one transaction; return the tokens written."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
            self._writing.update(pending)
        if not pending:
            return 0
        now = time.time()
        try:
            with self.engine.begin() as conn:
                for (expert_id, donor), tokens in sorted(pending.items()):
                    upsert(conn, ledger, {"expert_id": expert_id, "donor": donor, "tokens": tokens,
                                          "updated_at": now}, ["expert_id", "donor"], add=["tokens"])
        except Exception:
            with self._lock:
                self._pending.update(pending)  # kept for the next flush
            raise
        finally:
            with self._lock:
                self._writing.subtract(pending)
                self._writing = +self._writing
                self._written += 1
        return sum(pending.values())

    def rows(self) -> list[LedgerRow]:
        """Every ledger row, written and pending, most credits first."""
        return self._consistent(lambda pending: read_ledger(self.engine, pending=pending))

    def balance(self, donor: str) -> int:
        """Credits of one donor over all its experts (written and pending); 0 for no donor."""
        if not donor:
            return 0

        def read(pending: Counter[tuple[str, str]]) -> int:
            with self.engine.connect() as conn:
                written = conn.execute(select(func.coalesce(func.sum(ledger.c.tokens), 0))
                                       .where(ledger.c.donor == donor)).scalar_one()
            return int(written) + sum(n for (_, d), n in pending.items() if d == donor)

        return self._consistent(read)

    def _consistent(self, read):
        # a flush finishing between the snapshot and the read would count its tokens twice: read again
        for _ in range(5):
            with self._lock:
                seen, pending = self._written, self._pending + self._writing
            value = read(pending)
            with self._lock:
                if self._written == seen:
                    return value
        return value


def read_ledger(engine: Engine, pending: Counter | None = None) -> list[LedgerRow]:
    """The ledger in the store (plus pending (expert, donor) counts), most credits first."""
    with engine.connect() as conn:
        totals = Counter({(r.expert_id, r.donor): int(r.tokens) for r in conn.execute(select(ledger))})
    totals.update(pending or {})
    rows = [LedgerRow(donor=d, expert_id=e, tokens=n) for (e, d), n in totals.items()]
    return sorted(rows, key=lambda r: (-r.tokens, r.donor, r.expert_id))


class Admission:
    """At most max_active generations at once; waiters are served by credits (or arrival) as slots free up."""

    def __init__(self, policy: CreditPolicy) -> None:
        """Admit under this policy."""
        self.policy = policy
        self.running = 0
        self._waiting: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        """Generate calls waiting for a slot now."""
        return sum(not f.done() for _, _, f in self._waiting)

    def busy(self) -> bool:
        """True while a new generation would have to wait."""
        return 0 < self.policy.max_active <= self.running

    @contextlib.asynccontextmanager
    async def slot(self, credits: int) -> AsyncIterator[None]:
        """Hold a running slot for the block; waits while busy (a client with more credits first, by policy)."""
        if self.policy.max_active <= 0:
            yield
            return
        if self.busy() or self.waiting:
            rank = -credits if self.policy.by_credits else 0
            ticket = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (rank, next(self._order), ticket))
            try:
                await ticket  # the finishing generation hands its slot over: running stays counted
            except asyncio.CancelledError:
                if ticket.done() and not ticket.cancelled():
                    self._release()
                raise
        else:
            self.running += 1
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiting:
            _, _, ticket = heapq.heappop(self._waiting)
            if not ticket.done():
                ticket.set_result(None)
                return
        self.running -= 1
