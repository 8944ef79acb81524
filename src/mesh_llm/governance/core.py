"""Governance facade: signed halts, resumes and votes; proposals gated by tier and phase; actions; audit."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError
from sqlalchemy import Engine, delete, insert, select, update

from mesh_llm.governance import actions as action_store
from mesh_llm.governance import audit, integrity, phases
from mesh_llm.governance import proposals as prop
from mesh_llm.governance.actions import ActionRegistry
from mesh_llm.governance.errors import (
    DoubleVote,
    GovernanceError,
    InvalidMessage,
    InvalidProposal,
    MeshHalted,
    NotHalted,
    PhaseForbidden,
    PolicyError,
    ProposalClosed,
    ReplayedNonce,
    RoleForbidden,
    SignatureRefused,
    UnknownProposal,
    Unsigned,
)
from mesh_llm.governance.keys import parse_public_key
from mesh_llm.governance.killswitch import HaltPayload, HaltState, HaltSwitch, ResumePayload, current_halt, load_state
from mesh_llm.governance.policy import Member, PhaseRule, Policy, TrustRoot, load_members, load_policy, trust_root
from mesh_llm.governance.proposals import ProposalView, ProposePayload, VotePayload
from mesh_llm.governance.refusals import EVENT as GROUPED_REFUSALS
from mesh_llm.governance.refusals import RefusalDigest
from mesh_llm.governance.runner import ActionRunner
from mesh_llm.governance.signing import SignedMessage, verify
from mesh_llm.governance.tiers import ProposalIn, Tier
from mesh_llm.governance.tx import write_tx
from mesh_llm.store.governance_tables import halts, nonces, resume_votes

log = logging.getLogger(__name__)

Clock = Callable[[], float]


@dataclass(frozen=True, kw_only=True)
class PhaseInfo:
    phase: int  # current phase number
    rule: PhaseRule  # tiers and features it enables


class Governance:
    """Everything governance does, over one SQL store, one policy and one member list."""

    def __init__(self, *, engine: Engine, policy: Policy, members: list[Member], clock: Clock = time.time,
                 registry: ActionRegistry | None = None, members_path: Path | None = None,
                 root: TrustRoot | None = None, repair: bool = True) -> None:
        """Wrap a migrated engine; check the state tables against the audit log; load the halt state (the log's).

        With repair (the default), a halt the audit log shows but the halts table lost is written back;
        `mesh audit verify` opens without it, so it reports the disagreement instead.
        """
        self.engine = engine
        self.policy = policy
        self.clock = clock
        self.root = root  # where policy and members came from (None: given in code)
        self.registry = registry or ActionRegistry()
        self.switch = HaltSwitch()
        self._switch_lock = threading.RLock()  # a halt or resume in this process owns the switch until it is stored
        self._log_lock = threading.Lock()
        self._repair = repair
        self._unconfirmed: set[int] = set()  # table-only approvals already reported
        self.members_path = members_path
        self.digest = RefusalDigest(window_s=policy.signatures.refusal_window_s, clock=clock)
        self.runner = ActionRunner(engine=engine, registry=self.registry, clock=clock,
                                   is_halted=lambda: self.switch.is_halted, confirmed=self._approved_in_log)
        self._set_members(members)
        self.registry.register(phases.PHASE_CHANGE_KIND, self._apply_phase)
        self.registry.on_register(lambda _kind: self.run_pending_reverts())
        with self.engine.connect() as conn:
            self._log = integrity.replay(conn)
            for m in integrity.cross_check(conn, self._log, initial_phase=policy.initial_phase):
                log.error("state table %s disagrees with the audit log (row %s): %s; the log is trusted",
                          m.table, m.seq, m.problem)
        self.refresh()
        self.run_pending_reverts()  # a halt recorded while this process was down

    @classmethod
    def open(cls, db_url: str | None = None, *, gov_dir: Path | None = None, clock: Clock = time.time,
             registry: ActionRegistry | None = None, repair: bool = True) -> Governance:
        """Open the store at db_url and the policy and members in gov_dir (else the trust_root() default)."""
        from mesh_llm.store.db import open_engine

        root = trust_root(gov_dir)
        cls._check_dir(root)
        return cls.on_engine(open_engine(db_url), gov_dir=gov_dir, clock=clock, registry=registry, repair=repair)

    @classmethod
    def on_engine(cls, engine: Engine, *, gov_dir: Path | None = None, clock: Clock = time.time,
                  registry: ActionRegistry | None = None, repair: bool = True) -> Governance:
        """Governance over an already migrated engine (e.g. the router's) with the files in gov_dir (or the default)."""
        root = trust_root(gov_dir)
        cls._check_dir(root)
        folder = root.path
        log.info("%s", root.describe())
        return cls(engine=engine, policy=load_policy(folder / "policy.toml"),
                   members=load_members(folder / "members.toml"), clock=clock, registry=registry,
                   members_path=folder / "members.toml", root=root, repair=repair)

    @staticmethod
    def _check_dir(root: TrustRoot) -> None:
        if not (root.path / "policy.toml").is_file():
            raise PolicyError(f"no policy.toml in {root.path} ({root.describe()}): pass --governance DIR (or set "
                              "MESH_GOVERNANCE_DIR) naming the folder with policy.toml and members.toml")

    # members and quorums

    def _set_members(self, members: list[Member]) -> None:
        self.members = list(members)
        self._keys = {m.name: parse_public_key(m.public_key) for m in members}  # every signer, proposers too
        self._voters = {m.name: self._keys[m.name] for m in members if m.role == "member"}
        if len(self._voters) < 2:
            log.warning("only %d governance member(s): quorums are capped at that", len(self._voters))

    def reload_members(self) -> list[Member]:
        """Re-read members.toml (after an edit or `mesh members add`)."""
        if self.members_path is None:
            raise PolicyError("this Governance was built without a members file to reload")
        self._set_members(load_members(self.members_path))
        self._audit("members_reloaded", "governance", {"members": [m.name for m in self.members]})
        return self.members

    def _required(self, tier: str | Tier) -> int:
        return self.policy.required(self.policy.tiers[Tier(tier)].approvals, len(self._voters))

    # audit and refusals

    def _audit(self, event: str, actor: str, detail: dict) -> None:
        with write_tx(self.engine) as conn:
            audit.append(conn, ts=self.clock(), event=event, actor=actor[:128], detail=detail)

    @contextlib.contextmanager
    def _refusals(self, op: str, actor: str) -> Iterator[None]:
        try:
            yield
        except SignatureRefused as exc:  # the caller is not proven: count it, keep none of its text
            self._count_unauthenticated(op, exc)
            raise
        except GovernanceError as exc:
            log.warning("refused %s by %s: %s", op, actor, exc)
            self._audit("refused", actor, {"op": op, "error": type(exc).__name__, "message": str(exc)})
            raise

    def flush_refusals(self, *, force: bool = False) -> int:
        """Write the closed refusal window (an open one too with force) as one audit row; return its count."""
        detail = self.digest.take(force=force)
        if detail is None:
            return 0
        self._audit(GROUPED_REFUSALS, "governance", detail)
        log.warning("refused %d unauthenticated governance call(s) in %.0f s: %s", detail["count"],
                    detail["window_s"], detail["by"])
        return detail["count"]

    def _count_unauthenticated(self, op: str, exc: SignatureRefused) -> None:
        self.digest.add(op, type(exc).__name__)
        self.flush_refusals()

    def refuse_unsigned(self, op: str) -> Unsigned:
        """Count an unsigned request for op (grouped like other unauthenticated refusals); return the error to raise."""
        error = Unsigned(f"{op} must be signed by a key listed in members.toml (the agent's: role proposer); the "
                         "CLI signs with --key NAME")
        self._count_unauthenticated(op, error)
        return error

    def _verified(self, msg: SignedMessage, model: type[BaseModel], *, proposer_ok: bool = False):
        payload = verify(msg, self._keys, now=self.clock(), max_skew_s=self.policy.signatures.max_skew_s)
        if not proposer_ok and msg.signer not in self._voters:
            raise RoleForbidden(f"{msg.signer!r} is a proposer: it may submit proposals, not halt, resume or vote")
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            raise InvalidMessage(f"bad payload: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None

    def _consume_nonce(self, conn, msg: SignedMessage, now: float) -> None:
        # a nonce only matters while its message could pass the freshness check: it was received within
        # max_skew_s of its timestamp, which stops passing max_skew_s later, so 2 x max_skew_s is safe
        conn.execute(delete(nonces).where(nonces.c.ts < now - 2 * self.policy.signatures.max_skew_s))
        seen = conn.execute(select(nonces.c.nonce).where(nonces.c.signer == msg.signer,
                                                         nonces.c.nonce == msg.nonce)).first()
        if seen:
            raise ReplayedNonce(f"nonce {msg.nonce[:12]}... of {msg.signer!r} was already used")
        conn.execute(insert(nonces).values(signer=msg.signer, nonce=msg.nonce, ts=now))

    def _nonce_unused(self, msg: SignedMessage) -> None:
        with self.engine.connect() as conn:
            if conn.execute(select(nonces.c.nonce).where(nonces.c.signer == msg.signer,
                                                         nonces.c.nonce == msg.nonce)).first():
                raise ReplayedNonce(f"nonce {msg.nonce[:12]}... of {msg.signer!r} was already used")

    # kill switch

    def halt(self, msg: SignedMessage) -> HaltState:
        """Halt the mesh on a valid signed halt by any member; revert the last N applied actions."""
        with self._switch_lock:
            return self._halt(msg)

    def _halt(self, msg: SignedMessage) -> HaltState:
        with self._refusals("halt", msg.signer):
            payload = self._verified(msg, HaltPayload)
            self._nonce_unused(msg)
            self.switch._set(True, payload.reason)  # flag first: stopping must not wait for the store
            now = self.clock()
            try:
                with write_tx(self.engine) as conn:
                    self._consume_nonce(conn, msg, now)
                    row = current_halt(conn)
                    if row is not None:
                        audit.append(conn, ts=now, event="halt_repeated", actor=msg.signer,
                                     detail={"halt_id": row.id, "reason": payload.reason})
                    else:
                        halt_id = conn.execute(insert(halts).values(
                            reason=payload.reason, halted_by=msg.signer, halted_at=now)).inserted_primary_key[0]
                        reverts = action_store.request_reverts(
                            conn, last=self.policy.kill_switch.revert_last, halt_id=halt_id)
                        audit.append(conn, ts=now, event="halt", actor=msg.signer,
                                     detail={"halt_id": halt_id, "reason": payload.reason, "revert": reverts})
            except ReplayedNonce:  # lost a race with the same message: undo the early flag
                self.refresh()
                raise
        self.run_pending_reverts()
        return self.halt_state()

    def resume(self, msg: SignedMessage) -> HaltState:
        """Count a signed resume vote; lift the halt once the resume quorum is met."""
        with self._switch_lock:
            return self._resume(msg)

    def _resume(self, msg: SignedMessage) -> HaltState:
        with self._refusals("resume", msg.signer):
            payload = self._verified(msg, ResumePayload)
            now = self.clock()
            required = self.policy.required(self.policy.kill_switch.resume_quorum, len(self._voters))
            with write_tx(self.engine) as conn:
                self._consume_nonce(conn, msg, now)  # rolled back with everything else on a refusal
                row = current_halt(conn)
                if row is None:
                    raise NotHalted("the mesh is not halted; there is nothing to resume")
                if payload.halt_id is not None and payload.halt_id != row.id:
                    raise InvalidMessage(f"resume names halt {payload.halt_id}, the current halt is {row.id}")
                if conn.execute(select(resume_votes).where(resume_votes.c.halt_id == row.id,
                                                           resume_votes.c.member == msg.signer)).first():
                    raise DoubleVote(f"{msg.signer!r} already voted to resume halt {row.id}")
                conn.execute(insert(resume_votes).values(halt_id=row.id, member=msg.signer, ts=now))
                count = len(conn.execute(select(resume_votes.c.member)
                                         .where(resume_votes.c.halt_id == row.id)).all())
                lifted = count >= required
                if lifted:
                    conn.execute(update(halts).where(halts.c.id == row.id).values(resumed_at=now))
                audit.append(conn, ts=now, event="resumed" if lifted else "resume_vote", actor=msg.signer,
                             detail={"halt_id": row.id, "votes": count, "required": required})
        self.refresh()
        return self.halt_state()

    def halt_state(self) -> HaltState:
        """The stored halt state."""
        required = self.policy.required(self.policy.kill_switch.resume_quorum, len(self._voters))
        with self.engine.connect() as conn:
            return load_state(conn, required)

    def refresh(self) -> HaltState:
        """Bring the switch in line with the store; a halt the log shows but the halts table lost is restored."""
        if not self._switch_lock.acquire(blocking=False):
            return self.halt_state()  # a halt or resume of this process (another thread) sets the switch itself
        try:
            if self._halt_table_disagrees() and self._repair:
                self._restore_halt()
            state = self.halt_state()
            self.switch._set(state.halted, state.reason)
            return state
        finally:
            self._switch_lock.release()

    def _sync_log(self, conn) -> integrity.LogState:
        with self._log_lock:
            self._log = integrity.advance(conn, self._log)
            return self._log

    def _halt_table_disagrees(self) -> bool:
        with self.engine.connect() as conn:  # one snapshot of the log and the table
            logged = self._sync_log(conn).open_halt()
            stored = current_halt(conn)
        return logged is not None and (stored is None or stored.id < logged[0])

    def _restore_halt(self) -> None:
        now = self.clock()
        with write_tx(self.engine) as conn:
            repaired = integrity.restore_open_halt(conn, self._sync_log(conn))
            if repaired is None:
                return
            audit.append(conn, ts=now, event="state_repaired", actor="governance", detail=repaired)
        log.error("halt %d is in the audit log but the halts table lost it (%s): restored, the mesh stays halted",
                  repaired["halt_id"], repaired["problem"])

    def _approved_in_log(self, proposal_id: int) -> bool:
        with self.engine.connect() as conn:
            found = self._sync_log(conn).proposals.get(proposal_id)
        if found is None or found["status"] != prop.APPROVED:
            if proposal_id not in self._unconfirmed:  # once per proposal, not every watch round
                self._unconfirmed.add(proposal_id)
                log.error("proposal %d is approved in the table but not in the audit log: not applied (run "
                          "`mesh audit verify`)", proposal_id)
            return False
        return True

    def _halted_in_store(self, conn) -> bool:
        return self.switch.is_halted or current_halt(conn) is not None

    # proposals and votes

    def propose(self, msg: SignedMessage | None) -> ProposalView:
        """Submit a proposal signed by a member or proposer; its author is the verified signer."""
        if msg is None:
            raise self.refuse_unsigned("propose")
        with self._refusals("propose", msg.signer):
            payload = self._verified(msg, ProposePayload, proposer_ok=True)
            with write_tx(self.engine) as conn:
                self._consume_nonce(conn, msg, self.clock())
        return self.submit(payload.model_dump(exclude={"action"}), author=msg.signer)

    def submit(self, proposal: ProposalIn | dict, *, author: str) -> ProposalView:
        """Validate, classify and store a proposal by an author this process vouches for (remote ones: propose)."""
        with self._refusals("propose", author):
            try:
                p = proposal if isinstance(proposal, ProposalIn) else ProposalIn.model_validate(proposal)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise InvalidProposal(f"proposal field {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
            tier, why = self.registry.classify(p)
            rule = self.policy.tiers[tier]
            now = self.clock()
            with write_tx(self.engine) as conn:
                phase = phases.current(conn, self.policy)
                if tier != Tier.READ_ONLY and self._halted_in_store(conn):
                    raise MeshHalted("the mesh is halted (read-only): only read_only proposals are taken")
                allowed = self.policy.phases[phase]
                if not phases.allows(allowed, tier, p.kind):
                    raise PhaseForbidden(f"{p.kind} is tier {tier.value} ({why}); phase {phase} allows only "
                                         f"{[t.value for t in allowed.tiers]}")
                pid = prop.insert_proposal(conn, kind=p.kind, target=p.target, params=p.params,
                                           rationale=p.rationale, author=author, tier=tier.value, tier_reason=why,
                                           phase=phase, status=prop.OPEN, created_at=now,
                                           eligible_at=now + rule.timelock_s)
                audit.append(conn, ts=now, event="proposal_submitted", actor=author,
                             detail={"proposal_id": pid, "kind": p.kind, "target": p.target, "params": p.params,
                                     "tier": tier.value, "why": why, "phase": phase})
                self._retally(conn, pid, now)
        self.apply_due()
        return self.proposal(pid)

    def vote(self, msg: SignedMessage) -> ProposalView:
        """Count a member's signed approve/reject vote on an open proposal."""
        with self._refusals("vote", msg.signer):
            payload = self._verified(msg, VotePayload)
            now = self.clock()
            with write_tx(self.engine) as conn:
                self._consume_nonce(conn, msg, now)
                view = self._get(conn, payload.proposal_id)
                if view.status != prop.OPEN:
                    raise ProposalClosed(f"proposal {view.id} is {view.status}; it takes no more votes")
                if any(member == msg.signer for member, _ in view.votes):
                    raise DoubleVote(f"{msg.signer!r} already voted on proposal {view.id}")
                prop.add_vote(conn, proposal_id=view.id, member=msg.signer, choice=payload.choice, ts=now)
                audit.append(conn, ts=now, event="vote", actor=msg.signer,
                             detail={"proposal_id": view.id, "choice": payload.choice})
                self._retally(conn, view.id, now)
        self.apply_due()
        return self.proposal(payload.proposal_id)

    def record_sandbox(self, proposal_id: int, *, passed: bool, detail: str = "",
                       actor: str = "sandbox") -> ProposalView:
        """Record the automated sandbox validation of a sandbox_test proposal."""
        with self._refusals("sandbox", actor):
            now = self.clock()
            with write_tx(self.engine) as conn:
                view = self._get(conn, proposal_id)
                if view.status != prop.OPEN or not self.policy.tiers[Tier(view.tier)].sandbox:
                    raise ProposalClosed(f"proposal {proposal_id} ({view.status}, {view.tier}) takes no sandbox result")
                prop.set_status(conn, proposal_id, prop.OPEN, sandbox="passed" if passed else "failed")
                audit.append(conn, ts=now, event="sandbox_result", actor=actor,
                             detail={"proposal_id": proposal_id, "passed": passed, "detail": detail})
                self._retally(conn, proposal_id, now)
        self.apply_due()
        return self.proposal(proposal_id)

    def report_regression(self, proposal_id: int, *, detail: str, actor: str = "canary") -> ProposalView:
        """Report a regression after an applied proposal; its tier's rollback rule decides what happens."""
        with self._refusals("regression", actor):
            now = self.clock()
            with write_tx(self.engine) as conn:
                view = self._get(conn, proposal_id)
                if view.status != "applied":
                    raise ProposalClosed(f"proposal {proposal_id} is {view.status}, not applied")
                automatic = self.policy.tiers[Tier(view.tier)].rollback == "automatic"
                if automatic:
                    rows = conn.execute(select(action_store.actions.c.id).where(
                        action_store.actions.c.proposal_id == proposal_id,
                        action_store.actions.c.state == "applied")).scalars().all()
                    for action_id in rows:
                        action_store.mark(conn, action_id, state="revert_requested", from_state="applied", ts=now)
                audit.append(conn, ts=now, event="regression_reported", actor=actor,
                             detail={"proposal_id": proposal_id, "detail": detail, "automatic_rollback": automatic})
        self.run_pending_reverts()
        return self.proposal(proposal_id)

    def _get(self, conn, proposal_id: int) -> ProposalView:
        row = conn.execute(select(prop.proposals.c.tier).where(prop.proposals.c.id == proposal_id)).first()
        if row is None:
            raise UnknownProposal(f"no proposal {proposal_id}")
        return prop.get(conn, proposal_id, self._required(row.tier))

    def _retally(self, conn, proposal_id: int, now: float) -> str:
        view = self._get(conn, proposal_id)
        if view.status != prop.OPEN:
            return view.status
        rule = self.policy.tiers[Tier(view.tier)]
        decision = prop.decide(rule, required=view.required, members=len(self._voters), approvals=view.approvals,
                               rejections=view.rejections, sandbox=view.sandbox)
        if decision != prop.OPEN:
            prop.set_status(conn, proposal_id, decision, from_status=prop.OPEN, decided_at=now)
            audit.append(conn, ts=now, event=f"proposal_{decision}", actor="governance",
                         detail={"proposal_id": proposal_id, "approvals": view.approvals,
                                 "rejections": view.rejections, "required": view.required,
                                 "eligible_at": view.eligible_at})
        return decision

    def proposal(self, proposal_id: int) -> ProposalView:
        """One proposal with its votes."""
        with self.engine.connect() as conn:
            return self._get(conn, proposal_id)

    def proposals(self, status: str | None = None) -> list[ProposalView]:
        """Proposals, newest first."""
        with self.engine.connect() as conn:
            return prop.listing(conn, self._required, status)

    # actions

    def apply_due(self) -> list[int]:
        """Apply approved proposals whose timelock has passed and whose handler is registered."""
        return self.runner.apply_due()

    def run_pending_reverts(self) -> list[int]:
        """Revert every action marked for reverting whose handler is registered, newest first."""
        return self.runner.run_pending_reverts()

    @property
    def in_memory(self) -> bool:
        """True for an in-memory SQLite store (one database per connection, so no worker threads)."""
        url = self.engine.url
        return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")

    async def off_loop(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) in a worker thread, so a slow or locked store never stalls the event loop."""
        if self.in_memory:
            return fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    def watch_step(self) -> None:
        """One round of watch(): halts and resumes of other processes, reverts, due actions, closed refusal windows."""
        self.refresh()
        self.run_pending_reverts()
        self.apply_due()
        if self.digest.due():
            self.flush_refusals()

    async def watch(self, interval_s: float = 0.2) -> None:
        """Forever, off the event loop: watch_step() every interval_s; on cancel, write the open refusal window."""
        try:
            while True:
                try:
                    await self.off_loop(self.watch_step)
                except Exception:
                    log.exception("governance watch step failed")
                await asyncio.sleep(interval_s)
        finally:
            with contextlib.suppress(Exception):
                self.flush_refusals(force=True)

    # phases

    def _apply_phase(self, _target: str, params: dict) -> dict:
        with write_tx(self.engine) as conn:
            old = phases.current(conn, self.policy)
            phases.store(conn, int(params["phase"]))
        return {"phase": old}

    def phase(self) -> PhaseInfo:
        """Current phase and what it enables."""
        with self.engine.connect() as conn:
            number = phases.current(conn, self.policy)
        return PhaseInfo(phase=number, rule=self.policy.phases[number])

    def propose_phase(self, phase: int, *, author: str, rationale: str = "") -> ProposalView:
        """Submit a set_phase proposal (decided by the deploy_major rule in every phase)."""
        return self.submit({"kind": phases.PHASE_CHANGE_KIND, "target": "mesh", "params": {"phase": phase},
                            "rationale": rationale or f"move the mesh to phase {phase}"}, author=author)

    # audit

    def audit_rows(self, limit: int | None = None) -> list[audit.AuditRow]:
        """The last `limit` audit rows, oldest first."""
        with self.engine.connect() as conn:
            return audit.rows(conn, limit=limit)

    def verify_audit(self) -> audit.VerifyResult:
        """Walk the audit hash chain, check its signed head, and cross-check the state tables against it."""
        with self.engine.connect() as conn:
            chain = audit.verify(conn)
            found = integrity.cross_check(conn, integrity.replay(conn), initial_phase=self.policy.initial_phase)
        if not found:
            return chain
        lines = tuple(f"{m.table}: {m.problem}" + (f" (audit row {m.seq})" if m.seq else "") for m in found)
        if not chain.ok:
            return dataclasses.replace(chain, mismatches=lines)
        first = next((m.seq for m in found if m.seq), None)
        return audit.VerifyResult(ok=False, checked=chain.checked, first_bad_seq=first,
                                  problem=f"state tables disagree with the audit log: {lines[0]}", mismatches=lines)
