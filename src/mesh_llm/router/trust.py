"""Spot checks of experts against other experts of the same model, and a trust score per expert.

On a sampled fraction of rounds (MeshSettings.spot_check) the router asks referees, experts of the
same model that were not among those mixed (one, or two when only one reply was mixed), for the same
position, and compares every pair of replies. Two replies disagree when their symmetric KL divergence
(aggregation.divergences) is above `kl_tolerance`, when one's top token lies more than `top1_margin`
nats below the other's best, or when the log-probabilities of the ids both listed correlate less than
`min_correlation`. An expert that disagrees with most of (at least two) others fails the check; two
replies that disagree blame nobody. A failed check costs `penalty` trust, a passed one gives back
`recovery`; below `threshold` the expert is quarantined (the registry's quarantine state, never
selected, one audit row). Until then its mixing weight is scaled by its trust.

How the tolerances were set: `experiments/bench_trust.py calibrate --nf4` (tiny random Llama) and
`... calibrate --real --nf4` (smollm2-135m) compare top-64 replies of one model loaded as float32,
bfloat16 and NF4 over 192 / 256 teacher-forced positions of the Apache-2.0 license. Largest figures
between honest variants (both models; NF4 is always the farthest): KL 4.26 nats, top-1 gap 12.8 nats,
lowest correlation 0.16 (float32 against bfloat16 alone: KL 0.06, gap 0.06, correlation 0.99). The
tolerances sit just outside those: 5 nats, 14 nats, 0.1. Lies measured against them: all mass on one
token, KL 10.4 nats and more (always caught); shuffled log-probabilities, correlation median 0.0 and
KL median 4.1 (caught on most checks); another model's reply (tiny) or another position's (real),
correlation median -0.07 / 0.37 and KL median 1.8 / 8.8 (caught on many checks). A liar caught on only
some checks still loses trust, as every pass gives back much less than a failure takes. Experts of one
model are compared only with each other: distinct models of one tokenizer family are unequal
experts, not liars.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import Engine, insert, select, update

from mesh_llm.governance import audit
from mesh_llm.governance.tx import write_tx
from mesh_llm.mixing.aggregation import KL_FLOOR, divergences
from mesh_llm.mixing.selection import Candidate
from mesh_llm.router.metrics import router_metrics
from mesh_llm.router.registry import QUARANTINED, Registry
from mesh_llm.store.trust_tables import expert_trust
from mesh_llm.wire import SparseDist

log = logging.getLogger(__name__)

QUARANTINE_EVENT = "expert_quarantined"  # audit event written when trust falls below the threshold


@dataclass(frozen=True, kw_only=True)
class TrustConfig:
    kl_tolerance: float = 5.0  # symmetric KL (nats) above which two replies disagree
    top1_margin: float = 14.0  # nats: each reply's top token must be at most this far below the other's best
    min_correlation: float = 0.1  # log-probabilities of the ids both listed must correlate at least this much
    penalty: float = 0.3  # trust lost on a failed check
    recovery: float = 0.02  # trust regained on a passed check
    threshold: float = 0.15  # below this trust the expert is quarantined
    initial: float = 1.0  # trust of an expert never checked (and after an operator lifts a quarantine)
    flush_interval_s: float = 5.0  # changed trust is written at most this often (a quarantine at once)


@dataclass(frozen=True, kw_only=True)
class Comparison:
    kl: float  # symmetric KL divergence in nats
    top1_gap: float  # the larger of the two top-1 gaps in nats
    correlation: float  # Pearson correlation of the log-probabilities of the ids both listed (1 with fewer than 3)

    def agrees(self, config: TrustConfig) -> bool:
        """Whether the two replies are within the tolerances."""
        return (self.kl <= config.kl_tolerance and self.top1_gap <= config.top1_margin
                and self.correlation >= config.min_correlation)


def compare(a: SparseDist, b: SparseDist, vocab_size: int) -> Comparison:
    """Symmetric KL, top-1 gap (how far below one reply's best the other's top token lies) and correlation."""
    kl = float(divergences([a, b], vocab_size)[0, 1])
    return Comparison(kl=kl, top1_gap=max(_top1_gap(a, b, vocab_size), _top1_gap(b, a, vocab_size)),
                      correlation=_correlation(a, b))


def _correlation(a: SparseDist, b: SparseDist) -> float:
    _, ia, ib = np.intersect1d(a.ids, b.ids, assume_unique=True, return_indices=True)
    if len(ia) < 3:
        return 1.0
    x, y = a.logprobs[ia], b.logprobs[ib]
    if x.std() == 0 or y.std() == 0:
        return 1.0
    return float(np.corrcoef(x, y)[0, 1])


def _top1_gap(a: SparseDist, b: SparseDist, vocab_size: int) -> float:
    top = int(a.ids[np.argmax(a.logprobs)])
    best = max(float(b.logprobs.max()), b.spread_logprob(vocab_size))
    return best - max(b.logprob_of(top, vocab_size), KL_FLOOR)


def verdicts(replies: dict[str, SparseDist], vocab_size: int, config: TrustConfig
             ) -> dict[str, tuple[bool, str]]:
    """Per judged expert: (passed, what was measured); experts with no majority to judge them by are left out."""
    ids = sorted(replies)
    pairs = {(a, b): compare(replies[a], replies[b], vocab_size) for i, a in enumerate(ids) for b in ids[i + 1:]}
    out = {}
    for eid in ids:
        mine = [(other, pairs[(eid, other) if eid < other else (other, eid)]) for other in ids if other != eid]
        against = [(other, c) for other, c in mine if not c.agrees(config)]
        if len(mine) >= 2 and 2 * len(against) > len(mine):
            name, worst = max(against, key=lambda oc: oc[1].kl)
            detail = (f"disagreed with {len(against)} of {len(mine)} (vs {name}: KL {worst.kl:.3f} nats, "
                      f"top-1 gap {worst.top1_gap:.2f} nats, correlation {worst.correlation:.2f})")
            out[eid] = (False, detail)
        elif 2 * len(against) <= len(mine):
            out[eid] = (True, "")
    return out


@dataclass(frozen=True, kw_only=True)
class TrustRow:
    expert_id: str  # registry id
    trust: float  # 0..1
    checks: int  # checks with a verdict
    failed: int  # failed checks
    quarantined: bool  # out of selection by low trust
    last_failure: str  # what the latest failed check measured
    updated_at: float  # unix seconds


class TrustBook:
    """Trust per expert, kept in memory, written to the expert_trust table by flush (spot_check calls it when due)."""

    def __init__(self, engine: Engine, config: TrustConfig | None = None, *, registry: Registry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """Load the stored trust of every expert checked before; quarantines go to registry too when given."""
        self.engine = engine
        self.registry = registry
        self.config = config or TrustConfig()
        self.clock = clock
        self._lock = threading.Lock()
        self._dirty: set[str] = set()  # experts changed since the last flush
        self._audits: list[TrustRow] = []  # quarantines not yet written to the audit log
        self._flushed = time.monotonic()
        with engine.connect() as conn:
            self._rows = {r.expert_id: TrustRow(**r._mapping) for r in conn.execute(select(expert_trust))}

    def trust(self, expert_id: str) -> float:
        """The expert's trust (the initial value when never checked)."""
        with self._lock:
            row = self._rows.get(expert_id)
        return self.config.initial if row is None else row.trust

    def rows(self) -> list[TrustRow]:
        """Every expert's trust row, by expert id."""
        with self._lock:
            return sorted(self._rows.values(), key=lambda r: r.expert_id)

    def annotate(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """The candidates with their trust set, less those quarantined for low trust."""
        with self._lock:  # only the candidates' rows: the book may hold every expert of a large mesh
            rows = [self._rows.get(c.expert_id) for c in candidates]
        out = []
        for c, row in zip(candidates, rows):
            if row is not None and row.quarantined:
                if not self._lifted(c.expert_id):
                    continue
                with self._lock:
                    self._rows[c.expert_id] = replace(row, trust=self.config.initial, quarantined=False,
                                                      updated_at=self.clock())
                    self._dirty.add(c.expert_id)
                log.info("expert %s selectable again: an operator lifted its quarantine", c.expert_id)
                row = None
            trust = self.config.initial if row is None else row.trust
            out.append(c if c.trust == trust else replace(c, trust=trust))
        return out

    def _lifted(self, expert_id: str) -> bool:
        """Whether the registry no longer holds a trust-quarantined expert quarantined (an operator lifted it)."""
        return self.registry is not None and self.registry.get(expert_id).state != QUARANTINED

    def record(self, judged: dict[str, tuple[bool, str]]) -> list[str]:
        """Apply one check's verdicts (id -> (passed, detail)) in memory; the ids that just fell below the threshold."""
        cfg = self.config
        falls = []
        with self._lock:
            for eid, (passed, detail) in judged.items():
                row = self._rows.get(eid) or TrustRow(expert_id=eid, trust=cfg.initial, checks=0, failed=0,
                                                      quarantined=False, last_failure="", updated_at=0.0)
                if passed:
                    row = replace(row, trust=min(cfg.initial, row.trust + cfg.recovery), checks=row.checks + 1)
                else:
                    row = replace(row, trust=max(0.0, row.trust - cfg.penalty), checks=row.checks + 1,
                                  failed=row.failed + 1, last_failure=detail[:200])
                if not row.quarantined and row.trust < cfg.threshold:
                    falls.append(eid)
                    row = replace(row, quarantined=True)
                self._rows[eid] = replace(row, updated_at=self.clock())
                self._dirty.add(eid)
            self._audits.extend(self._rows[eid] for eid in falls)
        for eid in falls:
            if self.registry is not None:
                self.registry.quarantine(eid, f"trust {self._rows[eid].trust:.2f} after failed spot checks: "
                                              f"{self._rows[eid].last_failure}")
            log.warning("expert %s quarantined by spot checks: %s", eid, self._rows[eid].last_failure)
        return falls

    def due(self) -> bool:
        """Whether a quarantine waits to be written, or the last write is flush_interval_s old and rows changed."""
        with self._lock:
            return bool(self._audits) or (bool(self._dirty) and
                                          time.monotonic() - self._flushed >= self.config.flush_interval_s)

    def flush(self) -> int:
        """Write changed rows and the audit rows of new quarantines in one transaction; how many rows were written."""
        with self._lock:
            rows = [self._rows[eid] for eid in sorted(self._dirty)]
            audits, self._audits = self._audits, []
            self._dirty.clear()
            self._flushed = time.monotonic()
        if not rows and not audits:
            return 0
        with write_tx(self.engine) as conn:
            for row in rows:
                values = dict(row.__dict__)
                where = expert_trust.c.expert_id == row.expert_id
                if conn.execute(update(expert_trust).where(where).values(**values)).rowcount == 0:
                    conn.execute(insert(expert_trust).values(**values))
            for row in audits:
                audit.append(conn, ts=row.updated_at, event=QUARANTINE_EVENT, actor="router",
                             detail={"expert_id": row.expert_id, "trust": round(row.trust, 4), "checks": row.checks,
                                     "failed": row.failed, "last_failure": row.last_failure})
        return len(rows)


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    referee_calls: list  # CallResults of the referees asked (their sessions now hold the context)
    failed: set[str]  # experts that failed this check
    judged: dict[str, tuple[bool, str]]  # every verdict: expert id -> (passed, detail)


async def spot_check(used: Sequence, *, ranked: Sequence[Candidate], model_of: Callable[[str], str],
                     ask: Callable[[Candidate], Awaitable], vocab_size: int, book: TrustBook,
                     rng: np.random.Generator, spare: Sequence = ()) -> CheckResult:
    """Ask referees of the same model as the used replies for the same position, judge everyone, record trust.

    `used` are the CallResults about to be mixed, `ranked` the selectable candidates, `spare` good replies
    of this round that are not mixed (they referee without another call); per model, enough referees
    not among the used are asked for three replies where there are enough experts.
    """
    used_ids = {r.expert_id for r in used}
    groups: dict[str, list] = {}
    for r in used:
        groups.setdefault(model_of(r.expert_id), []).append(r)
    spare = [r for r in spare if r.ok and r.expert_id not in used_ids]
    asks: list[tuple[str, Candidate]] = []
    free: dict[str, list] = {}
    for model, peers in groups.items():
        need = max(1, 3 - len(peers))
        free[model] = [r for r in spare if model_of(r.expert_id) == model][:need]
        taken = used_ids | {r.expert_id for r in spare}
        pool = [c for c in ranked if c.expert_id not in taken and model_of(c.expert_id) == model]
        need = min(len(pool), need - len(free[model]))
        asks += [(model, pool[i]) for i in sorted(rng.permutation(len(pool))[:need])]
    calls = list(await asyncio.gather(*(ask(c) for _, c in asks)))
    judged: dict[str, tuple[bool, str]] = {}
    for model, peers in groups.items():
        replies = {r.expert_id: r.dist for r in peers + free[model]}
        replies.update({c.expert_id: r.dist for (m, c), r in zip(asks, calls) if m == model and r.ok})
        if len(replies) >= 2:
            judged.update(verdicts(replies, vocab_size, book.config))
    book.record(judged)
    if book.due():
        await asyncio.to_thread(book.flush)
    failed = {eid for eid, (passed, _) in judged.items() if not passed}
    return CheckResult(referee_calls=calls, failed=failed, judged=judged)


_BOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def trust_book(registry: Registry) -> TrustBook:
    """The TrustBook of the router that owns this expert Registry, on the registry's store (made on first use)."""
    book = _BOOKS.get(registry)
    if book is None:
        book = _BOOKS[registry] = TrustBook(registry.engine, registry=registry, clock=registry.clock)
        router_metrics(registry).watch_trust(book.rows)
    return book
