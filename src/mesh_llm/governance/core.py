"""Governance facade: signed halts, resumes and votes; proposals gated by tier and phase; actions; audit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ValidationError
from sqlalchemy import Engine, insert, select, update

from mesh_llm.governance import actions as action_store
from mesh_llm.governance import audit, phases
from mesh_llm.governance import proposals as prop
from mesh_llm.governance.actions import ActionRegistry
from mesh_llm.governance.errors import (
    DoubleVote, GovernanceError, InvalidMessage, InvalidProposal, MeshHalted, NotHalted, PhaseForbidden,
    PolicyError, ProposalClosed, ReplayedNonce, UnknownProposal,
)
from mesh_llm.governance.keys import parse_public_key
from mesh_llm.governance.killswitch import HaltPayload, HaltState, HaltSwitch, ResumePayload, current_halt, load_state
from mesh_llm.governance.policy import Member, PhaseRule, Policy, governance_dir, load_members, load_policy
from mesh_llm.governance.proposals import ProposalView, VotePayload
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
                 registry: ActionRegistry | None = None, members_path: Path | None = None) -> None:
        """Wrap a migrated engine; load the stored halt state into the switch."""
        self.engine = engine
        self.policy = policy
        self.clock = clock
        self.registry = registry or ActionRegistry()
        self.switch = HaltSwitch()
        self._switch_lock = threading.RLock()  # a halt or resume in this process owns the switch until it is stored
        self.members_path = members_path
        self.runner = ActionRunner(engine=engine, registry=self.registry, clock=clock,
                                   is_halted=lambda: self.switch.is_halted)
        self._set_members(members)
        self.registry.register(phases.PHASE_CHANGE_KIND, self._apply_phase)
        self.registry.on_register(lambda _kind: self.run_pending_reverts())
        self.refresh()
        self.run_pending_reverts()  # a halt recorded while this process was down

    @classmethod
    def open(cls, db_url: str | None = None, *, gov_dir: Path | None = None, clock: Clock = time.time,
             registry: ActionRegistry | None = None) -> Governance:
        """Open the store at db_url and the policy and members files in gov_dir (or governance_dir())."""
        from mesh_llm.store.db import open_engine

        folder = gov_dir or governance_dir()
        cls._check_dir(folder)
        return cls.on_engine(open_engine(db_url), gov_dir=folder, clock=clock, registry=registry)

    @classmethod
    def on_engine(cls, engine: Engine, *, gov_dir: Path | None = None, clock: Clock = time.time,
                  registry: ActionRegistry | None = None) -> Governance:
        """Governance over an already migrated engine (e.g. the router's) with the files in gov_dir."""
        folder = gov_dir or governance_dir()
        cls._check_dir(folder)
        return cls(engine=engine, policy=load_policy(folder / "policy.toml"),
                   members=load_members(folder / "members.toml"), clock=clock, registry=registry,
                   members_path=folder / "members.toml")

    @staticmethod
    def _check_dir(folder: Path) -> None:
        if not (folder / "policy.toml").is_file():
            raise PolicyError(f"no policy.toml in {folder}: set MESH_GOVERNANCE_DIR to the folder holding "
                              "policy.toml and members.toml (the repository's governance/)")

    # members and quorums

    def _set_members(self, members: list[Member]) -> None:
        self.members = list(members)
        self._keys = {m.name: parse_public_key(m.public_key) for m in members}
        if len(self._keys) < 2:
            log.warning("only %d governance member(s): quorums are capped at that", len(self._keys))

    def reload_members(self) -> list[Member]:
        """Re-read members.toml (after an edit or `mesh members add`)."""
        if self.members_path is None:
            raise PolicyError("this Governance was built without a members file to reload")
        self._set_members(load_members(self.members_path))
        self._audit("members_reloaded", "governance", {"members": [m.name for m in self.members]})
        return self.members

    def _required(self, tier: str | Tier) -> int:
        return self.policy.required(self.policy.tiers[Tier(tier)].approvals, len(self._keys))

    # audit and refusals

    def _audit(self, event: str, actor: str, detail: dict) -> None:
        with write_tx(self.engine) as conn:
            audit.append(conn, ts=self.clock(), event=event, actor=actor[:128], detail=detail)

    @contextlib.contextmanager
    def _refusals(self, op: str, actor: str) -> Iterator[None]:
        try:
            yield
        except GovernanceError as exc:
            log.warning("refused %s by %s: %s", op, actor, exc)
            self._audit("refused", actor, {"op": op, "error": type(exc).__name__, "message": str(exc)})
            raise

    def _verified(self, msg: SignedMessage, model: type[BaseModel]):
        payload = verify(msg, self._keys, now=self.clock(), max_skew_s=self.policy.signatures.max_skew_s)
        try:
            return model.model_validate(payload)
        except ValidationError as exc:
            raise InvalidMessage(f"bad payload: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None

    def _consume_nonce(self, conn, msg: SignedMessage, now: float) -> None:
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
            required = self.policy.required(self.policy.kill_switch.resume_quorum, len(self._keys))
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
        required = self.policy.required(self.policy.kill_switch.resume_quorum, len(self._keys))
        with self.engine.connect() as conn:
            return load_state(conn, required)

    def refresh(self) -> HaltState:
        """Bring the in-process switch in line with the store (halts and resumes by other processes)."""
        if not self._switch_lock.acquire(blocking=False):
            return self.halt_state()  # a halt or resume of this process (another thread) sets the switch itself
        try:
            state = self.halt_state()
            self.switch._set(state.halted, state.reason)
            return state
        finally:
            self._switch_lock.release()

    def _halted_in_store(self, conn) -> bool:
        return self.switch.is_halted or current_halt(conn) is not None

    # proposals and votes

    def submit(self, proposal: ProposalIn | dict, *, author: str) -> ProposalView:
        """Validate, classify and store a proposal; accept or apply it at once when its tier allows."""
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

    def record_sandbox(self, proposal_id: int, *, passed: bool, detail: str = "", actor: str = "sandbox") -> ProposalView:
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
        decision = prop.decide(rule, required=view.required, members=len(self._keys), approvals=view.approvals,
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

    async def watch(self, interval_s: float = 0.2) -> None:
        """Forever: follow halts/resumes made by other processes, run pending reverts and due actions."""
        while True:
            try:
                self.refresh()
                self.run_pending_reverts()
                self.apply_due()
            except Exception:
                log.exception("governance watch step failed")
            await asyncio.sleep(interval_s)

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
        """Walk the audit hash chain."""
        with self.engine.connect() as conn:
            return audit.verify(conn)
