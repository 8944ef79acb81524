"""Registry of experts: registration, heartbeats, health, RTT and failures, persisted in SQL.

All state lives in an in-memory cache; the per-token calls (record_success, record_failure,
candidates) never touch the database. Registration, quarantine and weight changes are written
through at once; counters and heartbeat times are written by flush(), which sweep() calls. The
owner calls sweep() every `sweep_interval_s` (a background task of the router server).

States: online (selectable), suspect (missed heartbeats for more than `suspect_after_missed`
intervals, or `max_failures` consecutive failures; not selected), quarantined (set by an
operator; never selected, kept across re-registration), gone (silent for `gone_after_s`; must
register again; hidden from listings once gone for `gone_retention_s`). A failure-suspect expert that still heartbeats gets one more chance after
`failure_cooldown_s` (a half-open circuit breaker).

Trust: `register` is called only after the router checked the expert (its Info answered from the
address, its tokenizer files hashed to its fingerprint); records loaded from the database are not
checked in this process, are never selected, and are told to register again on their next heartbeat.
An address is bound to the identity (derived from the expert's key) of its first registrant until its
record is gone: another identity cannot re-register it (heartbeats and deregistrations carry the token
issued to the expert id, see mesh_llm.auth). A donor identity and name have one row: a restarted
expert registering them again takes over its old row (and its id), whatever address it now serves on.
Which experts have answered a Step since they registered is kept too, so generation limits can be
taken from experts that proved they serve.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields

from sqlalchemy import Engine, bindparam, delete, insert, select, update

from mesh_llm.errors import MeshError
from mesh_llm.pb import expert_pb2, router_pb2
from mesh_llm.router.candidate_index import CandidateIndex
from mesh_llm.mixing.selection import Candidate
from mesh_llm.store.registry_tables import experts

log = logging.getLogger(__name__)

ONLINE, SUSPECT, QUARANTINED, GONE = "online", "suspect", "quarantined", "gone"


class UnknownExpert(MeshError, KeyError):
    """An expert id the registry has never seen."""


class AddressTaken(MeshError):
    """An address bound to another registrant's identity (its record is not gone)."""


@dataclass(frozen=True, kw_only=True)
class RegistryConfig:
    heartbeat_interval_s: float = 1.0  # how often experts are asked to heartbeat
    suspect_after_missed: float = 2.0  # silent for more than this many intervals: suspect
    gone_after_s: float = 5.0  # silent for more than this: gone (a dead expert is noticed within it)
    max_failures: int = 3  # consecutive Step failures that make an expert suspect
    failure_cooldown_s: float = 10.0  # a failure-suspect expert that heartbeats is retried after this
    rtt_alpha: float = 0.2  # weight of a new sample in the RTT moving average
    sweep_interval_s: float = 0.5  # how often the owner should call sweep()
    gone_retention_s: float = 3600.0  # gone experts silent longer than this are left out of listings
    follow_store: bool = True  # each sweep takes in experts other routers on the same store registered


@dataclass(frozen=True, kw_only=True)
class ExpertSpec:
    model_id: str  # catalog name or path of the loaded model
    tokenizer_fingerprint: str  # experts are only mixed within one fingerprint
    vocab_size: int  # rows of the output distribution
    context_limit: int  # most tokens a session may hold
    device: str = "cpu"  # "cpu", "cuda:0", ...
    quantization: str = "none"  # "none", "nf4", ...
    dtype: str = "float32"  # compute dtype
    tokens_per_second: float = 0.0  # measured decode speed (capacity)
    max_top_k: int = 256  # largest top_k a Step may ask for
    eos_token_ids: tuple[int, ...] = ()  # token ids that end a generation
    max_sessions: int = 8  # sessions held before eviction
    expert_version: str = ""  # mesh_llm version of the expert

    @classmethod
    def from_proto(cls, info: expert_pb2.ExpertInfo) -> ExpertSpec:
        """The spec an ExpertInfo message describes."""
        values = {f.name: getattr(info, f.name) for f in fields(ExpertSpec)}
        return cls(**{**values, "eos_token_ids": tuple(info.eos_token_ids), "tokens_per_second": float(info.tokens_per_second)})


@dataclass(frozen=True, kw_only=True)
class ExpertRecord(ExpertSpec):
    expert_id: str  # registry id
    name: str  # donor-chosen label
    address: str  # host:port of the expert's gRPC server
    weight: float  # mixing weight
    rtt_ms: float | None  # smoothed Step round-trip time; None while unmeasured
    failures: int  # consecutive failures
    last_failure: str  # kind of the most recent failure
    tokens_served: int  # tokens it contributed to
    active_sessions: int  # sessions it reported in its last heartbeat
    state: str  # online, suspect, quarantined, gone
    registered_at: float  # unix seconds of first registration
    last_seen: float  # unix seconds of the last heartbeat or successful Step
    identity: str = ""  # registrant identity (derived from its key); "" for rows from before it was kept
    # tokens_per_second (from ExpertSpec) is the latest reported capacity.

    def to_proto(self) -> router_pb2.ExpertStatus:
        """This record as the ExpertStatus message of ListExperts and GetRouterStatus."""
        same = ("expert_id", "address", "model_id", "tokenizer_fingerprint", "state", "failures", "tokens_per_second",
                "device", "quantization", "weight", "tokens_served", "name")
        return router_pb2.ExpertStatus(
            **{k: getattr(self, k) for k in same}, rtt_ms=self.rtt_ms or 0.0, last_seen_unix=self.last_seen
        )


_SPEC_FIELDS = [f.name for f in fields(ExpertSpec)]


def _to_db(row: dict) -> dict:
    return {**row, "eos_token_ids": ",".join(str(t) for t in row["eos_token_ids"])}


def _candidate(expert_id: str, row: dict) -> Candidate:
    rtt = row["rtt_ms"]
    return Candidate(expert_id=expert_id, rtt_ms=math.nan if rtt is None else rtt, weight=row["weight"],
                     tokens_per_second=row["tokens_per_second"], tokenizer_fingerprint=row["tokenizer_fingerprint"])


class _Candidates:
    """Candidates per expert, rebuilt only when the row's selection fields changed (most stay as they were)."""

    def __init__(self) -> None:
        self._made: dict[str, tuple[tuple, Candidate]] = {}

    def of(self, expert_id: str, row: dict) -> Candidate:
        """The expert's candidate as its row stands now."""
        key = (row["rtt_ms"], row["weight"], row["tokens_per_second"], row["tokenizer_fingerprint"])
        made = self._made.get(expert_id)
        if made is None or made[0] != key:
            made = self._made[expert_id] = (key, _candidate(expert_id, row))
        return made[1]

    def forget(self, expert_id: str) -> None:
        """Drop a removed expert's candidate."""
        self._made.pop(expert_id, None)


def _from_db(row) -> dict:
    data = dict(row._mapping)
    text = data["eos_token_ids"]
    data["eos_token_ids"] = tuple(int(t) for t in text.split(",")) if text else ()
    return data


class Registry:
    """The router's experts, cached in memory and persisted through a SQLAlchemy engine."""

    def __init__(
        self, engine: Engine, config: RegistryConfig | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.config = config or RegistryConfig()
        self.clock = clock
        self._lock = threading.Lock()
        self._dirty: set[str] = set()  # experts changed since the last flush
        with engine.connect() as conn:
            self._rows = {r.expert_id: _from_db(r) for r in conn.execute(select(experts))}
        self._by_address = {row["address"]: eid for eid, row in self._rows.items()}
        self._owners: dict[str, str] = {}  # address -> identity of the registrant it is bound to
        self._checked: set[str] = set()  # experts registered (so checked) by this process
        self._answered: set[str] = set()  # experts with a good Step reply since they registered
        self._unanswered: dict[str, int] = {}  # stragglers not waited for since their last good reply
        self._shared: set[str] = set()  # live experts another router on this store registered
        self._index = CandidateIndex()  # online checked experts, for bounded per-token samples
        self._candidates = _Candidates()
        self._sampler = random.Random()
        now = self.clock()
        self._since = {eid: now for eid in self._rows}  # when each expert entered its current state
        for row in self._rows.values():
            if row["state"] == ONLINE:  # not heard from since before this start: online again on a heartbeat
                self._set_state(row, SUSPECT, now)
                self._dirty.add(row["expert_id"])
        log.info("registry loaded %d experts", len(self._rows))

    # registration and heartbeats -------------------------------------------------------------

    def register(self, address: str, spec: ExpertSpec, *, name: str = "", identity: str = "") -> str:
        """Add a checked expert, or refresh the one at address; its id, or AddressTaken for another identity."""
        now = self.clock()
        with self._lock:
            at_address = self._by_address.get(address)
            self._check_owner(address, at_address, identity)
            expert_id = self._donor_row(identity, name) or at_address
            if expert_id is not None and self._rows[expert_id].get("identity") not in ("", identity):
                expert_id = None  # a gone row of another identity: this registrant gets a row of its own
            replaced = [eid for eid in (at_address,) if eid is not None and eid != expert_id]
            for eid in replaced:  # gone, or this identity's under another name: one row per address
                self._drop(eid)
            fresh = expert_id is None
            if fresh:
                expert_id = f"e-{uuid.uuid4().hex[:12]}"
                row = {"expert_id": expert_id, "address": address, "weight": 1.0, "tokens_served": 0,
                       "registered_at": now, "state": ONLINE, "name": name}
                self._since[expert_id] = now
            else:
                row = self._rows[expert_id]
                if self._by_address.get(row["address"]) == expert_id:
                    del self._by_address[row["address"]]
                row["address"] = address
            row.update({k: getattr(spec, k) for k in _SPEC_FIELDS})
            row.update(rtt_ms=None, failures=0, last_failure="", identity=identity,
                       active_sessions=0, last_seen=now, name=name or row.get("name", ""))
            if row["state"] != QUARANTINED:
                self._set_state(row, ONLINE, now)
            self._rows[expert_id] = row
            self._by_address[address] = expert_id
            self._owners[address] = identity
            self._checked.add(expert_id)
            self._shared.discard(expert_id)  # registered here now: this router keeps its state
            self._reindex(row)
            self._answered.discard(expert_id)  # it proves itself again with this Info
            self._unanswered.pop(expert_id, None)
            self._dirty.discard(expert_id)
            snapshot = _to_db(row)
        with self.engine.begin() as conn:
            if replaced:
                conn.execute(delete(experts).where(experts.c.expert_id.in_(replaced)))
            if fresh:
                conn.execute(insert(experts).values(**snapshot))
            else:
                conn.execute(update(experts).where(experts.c.expert_id == expert_id).values(**snapshot))
        log.info("%s expert %s at %s (%s)", "registered" if fresh else "re-registered", expert_id, address, spec.model_id)
        return expert_id

    def heartbeat(self, expert_id: str, *, active_sessions: int | None = None, tokens_per_second: float | None = None) -> bool:
        """Note that an expert is alive; False when it is unknown, gone or unchecked and must register again."""
        now = self.clock()
        with self._lock:
            row = self._rows.get(expert_id)
            if row is None or row["state"] == GONE or expert_id not in self._checked:
                return False
            row["last_seen"] = now
            if active_sessions is not None:
                row["active_sessions"] = int(active_sessions)
            if tokens_per_second is not None and tokens_per_second > 0:
                row["tokens_per_second"] = float(tokens_per_second)
            if row["state"] == SUSPECT:
                self._maybe_recover(row, now)
            self._dirty.add(expert_id)
            return True

    def check_address(self, address: str, identity: str) -> None:
        """AddressTaken when address is bound to another identity and its record is not gone."""
        with self._lock:
            self._check_owner(address, self._by_address.get(address), identity)

    def deregister(self, expert_id: str, reason: str = "") -> bool:
        """Mark an expert that is leaving on purpose gone at once; False when the id is unknown."""
        with self._lock:
            row = self._rows.get(expert_id)
            if row is None:
                return False
            old = row["state"]
            if old != QUARANTINED:  # a quarantine outlives the expert leaving and coming back
                self._set_state(row, GONE, self.clock())
            self._dirty.add(expert_id)
        log.info("expert %s deregistered (%s): %s -> %s", expert_id, reason or "no reason given", old, row["state"])
        self.flush()
        return True

    # the per-token path ---------------------------------------------------------------------

    def record_success(self, expert_id: str, rtt_ms: float, tokens: int = 1) -> None:
        """Count a good Step reply: update the smoothed RTT, reset failures, add served tokens."""
        with self._lock:
            row = self._row(expert_id)
            self._add_rtt(row, rtt_ms)
            row["failures"] = 0
            row["tokens_served"] += int(tokens)
            self._answered.add(expert_id)
            self._unanswered.pop(expert_id, None)
            row["last_seen"] = now = self.clock()
            if row["state"] == SUSPECT:
                self._set_state(row, ONLINE, now)
            self._dirty.add(expert_id)

    def record_failure(self, expert_id: str, kind: str, rtt_ms: float | None = None) -> None:
        """Count a failed, rejected or late Step reply (rtt_ms: the time it cost); max_failures in a row: suspect."""
        with self._lock:
            row = self._row(expert_id)
            if rtt_ms is not None:
                self._add_rtt(row, rtt_ms)
            row["failures"] += 1
            row["last_failure"] = kind[:200]
            if row["state"] == ONLINE and row["failures"] >= self.config.max_failures:
                self._set_state(row, SUSPECT, self.clock())
                log.warning("expert %s suspect after %d failures (last: %s)", expert_id, row["failures"], kind)
            self._dirty.add(expert_id)

    def record_wait(self, expert_id: str, waited_ms: float) -> None:
        """A straggler not waited for: no failure; unmeasured and missing max_failures in a row, waited_ms is its RTT."""
        with self._lock:
            row = self._row(expert_id)
            missed = self._unanswered[expert_id] = self._unanswered.get(expert_id, 0) + 1
            if row["rtt_ms"] is None and missed >= self.config.max_failures:
                row["rtt_ms"] = float(waited_ms)
                self._dirty.add(expert_id)

    def checked(self, expert_id: str) -> bool:
        """Whether this router, or a live one on the same store, registered (so checked) the expert."""
        with self._lock:
            return self._vouched(expert_id)

    def answered(self, expert_id: str) -> bool:
        """Whether the expert gave a good Step reply since it registered."""
        with self._lock:
            return expert_id in self._answered

    def candidates(self) -> list[Candidate]:
        """Online checked experts as selection candidates (RTT NaN while unmeasured)."""
        with self._lock:
            return [_candidate(eid, row) for eid, row in self._rows.items()
                    if row["state"] == ONLINE and self._vouched(eid)]

    def sample_candidates(self, fingerprint: str, size: int, keep: Iterable[str] = ()) -> list[Candidate]:
        """Online checked experts of weight > 0 of a fingerprint: all when at most size, else some of keep and a random fill."""
        with self._lock:
            if self._index.count(fingerprint) <= size:
                ids = self._index.sample(fingerprint, size, self._sampler)
                return [self._candidates.of(eid, self._rows[eid]) for eid in sorted(ids, key=self._registration_order)]
            chosen: dict[str, None] = {}
            for eid in keep:  # the kept experts fill at most three quarters, the rest explores
                if len(chosen) >= size * 3 // 4:
                    break
                if self._index.holds(eid, fingerprint):
                    chosen[eid] = None
            for eid in self._index.sample(fingerprint, size, self._sampler):
                if len(chosen) >= size:
                    break
                chosen[eid] = None
            return [self._candidates.of(eid, self._rows[eid]) for eid in chosen]

    # operator actions -----------------------------------------------------------------------

    def quarantine(self, expert_id: str, reason: str = "") -> None:
        """Never select this expert again until unquarantined (survives re-registration)."""
        with self._lock:
            row = self._row(expert_id)
            self._set_state(row, QUARANTINED, self.clock())
            self._dirty.add(expert_id)
        log.warning("expert %s quarantined: %s", expert_id, reason or "no reason given")
        self.flush()

    def unquarantine(self, expert_id: str) -> None:
        """Make a quarantined expert selectable again (online, failures cleared)."""
        with self._lock:
            row = self._row(expert_id)
            if row["state"] == QUARANTINED:
                row["failures"] = 0
                self._set_state(row, ONLINE, self.clock())
                self._dirty.add(expert_id)
        self.flush()

    def set_weight(self, expert_id: str, weight: float) -> None:
        """Set an expert's mixing weight (finite, >= 0; 0 = never selected)."""
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        with self._lock:
            row = self._row(expert_id)
            row["weight"] = float(weight)
            self._reindex(row)
            self._dirty.add(expert_id)
        self.flush()

    # health sweep and persistence -----------------------------------------------------------

    def sweep(self, now: float | None = None) -> list[tuple[str, str, str]]:
        """Apply heartbeat timeouts and failure cool-downs, flush; return (id, old, new) changes."""
        now = self.clock() if now is None else now
        if self.config.follow_store:
            self.follow_store(now)
        suspect_after = self.config.suspect_after_missed * self.config.heartbeat_interval_s
        changes = []
        with self._lock:
            for eid, row in self._rows.items():
                if eid in self._shared:
                    continue  # its registering router keeps its state; follow_store copies it
                old = row["state"]
                silent = now - row["last_seen"]
                if old in (ONLINE, SUSPECT) and silent > self.config.gone_after_s:
                    self._set_state(row, GONE, now)
                elif old == ONLINE and silent > suspect_after:
                    self._set_state(row, SUSPECT, now)
                elif old == SUSPECT and silent <= suspect_after:
                    self._maybe_recover(row, now)
                if row["state"] != old:
                    changes.append((eid, old, row["state"]))
                    self._dirty.add(eid)
        for eid, old, new in changes:
            log.log(logging.WARNING if new in (SUSPECT, GONE) else logging.INFO, "expert %s: %s -> %s", eid, old, new)
        self.flush()
        return changes

    def follow_store(self, now: float | None = None) -> int:
        """Take in the experts other routers on this store registered: live ones become selectable; count them."""
        now = self.clock() if now is None else now
        alive_within = self.config.suspect_after_missed * self.config.heartbeat_interval_s
        with self.engine.connect() as conn:
            stored = [_from_db(r) for r in conn.execute(select(experts))]
        with self._lock:
            for data in stored:
                eid = data["expert_id"]
                if eid in self._checked:
                    continue  # registered here: this router's memory is the newer one
                local = self._rows.get(eid)
                if local is not None and self._by_address.get(local["address"]) == eid:
                    del self._by_address[local["address"]]
                mine = {k: local[k] for k in ("rtt_ms", "failures", "last_failure")} if local else {}
                row = {**data, "rtt_ms": None, "failures": 0, "last_failure": "", **mine}
                alive = data["state"] in (ONLINE, SUSPECT) and now - data["last_seen"] <= alive_within
                if alive:
                    self._shared.add(eid)
                    if data["identity"]:  # the address stays bound to its registrant at every router
                        self._owners[data["address"]] = data["identity"]
                else:
                    self._shared.discard(eid)
                state = data["state"] if not alive else ONLINE if row["failures"] < self.config.max_failures else SUSPECT
                row["state"] = local["state"] if local else state
                self._rows[eid] = row
                self._by_address[row["address"]] = eid
                self._set_state(row, state, now)
                self._reindex(row)
                self._dirty.discard(eid)
            return len(self._shared)

    def flush(self) -> int:
        """Write every changed expert to the database; return how many rows were written."""
        with self._lock:
            rows = [_to_db(self._rows[eid]) for eid in self._dirty if eid not in self._shared]
            self._dirty.clear()
        if rows:
            by_id = update(experts).where(experts.c.expert_id == bindparam("row_id"))
            with self.engine.begin() as conn:  # one executemany: a sweep of thousands of heartbeats stays short
                conn.execute(by_id, [{**row, "row_id": row["expert_id"]} for row in rows])
        return len(rows)

    def get(self, expert_id: str) -> ExpertRecord:
        """A snapshot of one expert; UnknownExpert if the id was never registered."""
        with self._lock:
            return ExpertRecord(**self._row(expert_id))

    def listed(self, include_gone: bool = False, now: float | None = None) -> list[ExpertRecord]:
        """Experts to show: all of them with include_gone, else without those gone for the retention period."""
        now = self.clock() if now is None else now
        keep = self.config.gone_retention_s
        return [r for r in self.experts() if include_gone or r.state != GONE or now - r.last_seen <= keep]

    def experts(self) -> list[ExpertRecord]:
        """Snapshots of every expert ever registered, by registration time."""
        with self._lock:
            records = [ExpertRecord(**row) for row in self._rows.values()]
        return sorted(records, key=lambda r: (r.registered_at, r.expert_id))

    # internals ------------------------------------------------------------------------------

    def _row(self, expert_id: str) -> dict:
        row = self._rows.get(expert_id)
        if row is None:
            raise UnknownExpert(f"no expert {expert_id!r} in the registry")
        return row

    def _donor_row(self, identity: str, name: str) -> str | None:
        """The id of the row registered by this identity under this name, if any."""
        if not identity:
            return None
        for eid, row in self._rows.items():
            if row.get("identity") == identity and row["name"] == name:
                return eid
        return None

    def _drop(self, expert_id: str) -> None:
        """Forget a row in memory (the caller deletes it from the database)."""
        row = self._rows.pop(expert_id)
        if self._by_address.get(row["address"]) == expert_id:
            del self._by_address[row["address"]]
        for held in (self._checked, self._answered, self._dirty, self._shared):
            held.discard(expert_id)
        self._index.discard(expert_id)
        self._candidates.forget(expert_id)
        self._unanswered.pop(expert_id, None)
        self._since.pop(expert_id, None)
        log.info("expert %s at %s replaced by a new registration", expert_id, row["address"])

    def _check_owner(self, address: str, expert_id: str | None, identity: str) -> None:
        owner = self._owners.get(address)
        if expert_id is None or owner is None or owner == identity or self._rows[expert_id]["state"] == GONE:
            return
        raise AddressTaken(f"{address} is registered to expert {expert_id} by another key; an expert re-registers "
                           "with the key it registered with, and a new one serves on an address of its own")

    def _add_rtt(self, row: dict, rtt_ms: float) -> None:
        old = row["rtt_ms"]
        alpha = self.config.rtt_alpha
        row["rtt_ms"] = float(rtt_ms) if old is None else (1 - alpha) * old + alpha * float(rtt_ms)
        self._candidates.of(row["expert_id"], row)  # built here, off the per-token path of the next sample

    def _set_state(self, row: dict, state: str, now: float) -> None:
        if row["state"] != state:
            row["state"] = state
            self._since[row["expert_id"]] = now
            self._reindex(row)

    def _reindex(self, row: dict) -> None:
        eid = row["expert_id"]
        if row["state"] == ONLINE and row["weight"] > 0 and self._vouched(eid):
            self._index.add(eid, row["tokenizer_fingerprint"])
        else:
            self._index.discard(eid)

    def _registration_order(self, expert_id: str) -> tuple[float, str]:
        return self._rows[expert_id]["registered_at"], expert_id

    def _vouched(self, expert_id: str) -> bool:
        return expert_id in self._checked or expert_id in self._shared

    def _maybe_recover(self, row: dict, now: float) -> None:
        """A heard-from suspect goes online, after the cool-down if it was failing (one more try)."""
        limit = self.config.max_failures
        if row["failures"] < limit:
            self._set_state(row, ONLINE, now)
        elif now - self._since.get(row["expert_id"], now) >= self.config.failure_cooldown_s:
            row["failures"] = limit - 1
            self._set_state(row, ONLINE, now)

