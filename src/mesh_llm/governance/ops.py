"""What the `mesh` governance commands do: act on the local store, or on a router over gRPC."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc

from mesh_llm.governance import convert, errors, keys
from mesh_llm.governance.audit import AuditRow, VerifyResult
from mesh_llm.governance.core import Governance, PhaseInfo
from mesh_llm.governance.errors import GovernanceError
from mesh_llm.governance.killswitch import HaltState
from mesh_llm.governance.phases import PHASE_CHANGE_KIND
from mesh_llm.governance.policy import Member, PhaseRule, add_member, governance_dir, load_members
from mesh_llm.governance.proposals import ProposalView
from mesh_llm.governance.signing import SignedMessage, sign
from mesh_llm.grpc_util import blocking_channel
from mesh_llm.grpc_util import channel as aio_channel
from mesh_llm.pb import governance_pb2 as pb
from mesh_llm.pb import governance_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 10.0  # per call to a router


def error_from_rpc(exc: grpc.RpcError, router: str) -> GovernanceError:
    """The governance error a router's refusal names (its class from the 'Name: message' details)."""
    details = exc.details() or ""
    unreachable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    if unreachable and "MeshHalted" not in details:
        return errors.Unreachable(f"cannot reach the governance service at {router}: {details}")
    cls = getattr(errors, details.split(":", 1)[0], None)
    if not (isinstance(cls, type) and issubclass(cls, GovernanceError)):
        cls = GovernanceError
    return cls(f"router refused: {details}")


@contextlib.contextmanager
def _remote(router: str) -> Iterator[pb_grpc.GovernanceStub]:
    with blocking_channel(router) as channel:
        try:
            yield pb_grpc.GovernanceStub(channel)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, router) from None


def _signed(key_name: str, payload: dict) -> SignedMessage:
    return sign(keys.load_key(key_name), key_name, payload)


def proposal_message(key_name: str, proposal: dict) -> SignedMessage:
    """A proposal (kind, target, params, rationale) signed with the key called key_name."""
    return _signed(key_name, {"action": "propose", **{k: proposal[k] for k in ("kind", "target", "params",
                                                                              "rationale")}})


def proposal_request(msg: SignedMessage) -> pb.SubmitProposalRequest:
    """The SubmitProposal request carrying a signed proposal."""
    return pb.SubmitProposalRequest(signed=convert.signed_to_pb(msg))


async def submit_proposal(router: str, msg: SignedMessage, *, timeout: float = RPC_TIMEOUT_S) -> ProposalView:
    """Send a signed proposal to the router's Governance service (asyncio); refusals raise their GovernanceError."""
    async with aio_channel(router) as ch:
        try:
            reply = await pb_grpc.GovernanceStub(ch).SubmitProposal(proposal_request(msg), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc, router) from None
    return convert.proposal_from_pb(reply)


def new_key(name: str) -> str:
    """Create key NAME under MESH_HOME/keys; return its public key."""
    return keys.new_key(name)


def members_add(name: str, public_key: str, *, role: str = "member", gov_dir: Path | None = None) -> Member:
    """Add a member (or a proposer) to members.toml in the governance folder."""
    return add_member(governance_dir(gov_dir) / "members.toml", name, public_key, role=role)


def members_list(*, gov_dir: Path | None = None) -> list[Member]:
    """Members listed in members.toml."""
    return load_members(governance_dir(gov_dir) / "members.toml")


def halt_mesh(*, key: str, reason: str, router: str | None = None, db: str | None = None,
              gov_dir: Path | None = None) -> HaltState:
    """Sign a halt with key and send it to the router, or apply it to the local store."""
    msg = _signed(key, {"action": "halt", "reason": reason})
    if router:
        with _remote(router) as stub:
            return convert.halt_from_pb(stub.HaltMesh(convert.signed_to_pb(msg), timeout=RPC_TIMEOUT_S))
    return Governance.open(db, gov_dir=gov_dir).halt(msg)


def resume_mesh(*, key: str, router: str | None = None, db: str | None = None,
                gov_dir: Path | None = None) -> HaltState:
    """Sign a resume vote with key and send it to the router or the local store."""
    msg = _signed(key, {"action": "resume"})
    if router:
        with _remote(router) as stub:
            return convert.halt_from_pb(stub.ResumeMesh(convert.signed_to_pb(msg), timeout=RPC_TIMEOUT_S))
    return Governance.open(db, gov_dir=gov_dir).resume(msg)


def halt_state(*, router: str | None = None, db: str | None = None,
               gov_dir: Path | None = None) -> HaltState:
    """Whether the mesh is halted."""
    if router:
        with _remote(router) as stub:
            return convert.halt_from_pb(stub.GetHaltState(pb.GetHaltStateRequest(), timeout=RPC_TIMEOUT_S))
    return Governance.open(db, gov_dir=gov_dir).halt_state()


def cast_vote(*, proposal_id: int, choice: str, key: str, router: str | None = None,
              db: str | None = None, gov_dir: Path | None = None) -> ProposalView:
    """Sign and cast an approve/reject vote on a proposal."""
    msg = _signed(key, {"action": "vote", "proposal_id": proposal_id, "choice": choice})
    if router:
        with _remote(router) as stub:
            return convert.proposal_from_pb(stub.CastVote(convert.signed_to_pb(msg), timeout=RPC_TIMEOUT_S))
    return Governance.open(db, gov_dir=gov_dir).vote(msg)


def list_proposals(*, status: str | None = None, router: str | None = None, db: str | None = None,
                   gov_dir: Path | None = None) -> list[ProposalView]:
    """Proposals, newest first."""
    if router:
        with _remote(router) as stub:
            reply = stub.ListProposals(pb.ListProposalsRequest(status=status or ""), timeout=RPC_TIMEOUT_S)
            return [convert.proposal_from_pb(p) for p in reply.proposals]
    return Governance.open(db, gov_dir=gov_dir).proposals(status)


def show_proposal(proposal_id: int, *, router: str | None = None, db: str | None = None,
                  gov_dir: Path | None = None) -> ProposalView:
    """One proposal with its votes."""
    if router:
        with _remote(router) as stub:
            return convert.proposal_from_pb(stub.GetProposal(pb.GetProposalRequest(id=proposal_id),
                                                             timeout=RPC_TIMEOUT_S))
    return Governance.open(db, gov_dir=gov_dir).proposal(proposal_id)


def audit_show(*, limit: int | None = None, router: str | None = None, db: str | None = None,
               gov_dir: Path | None = None) -> list[AuditRow]:
    """The last audit rows, oldest first."""
    if router:
        with _remote(router) as stub:
            reply = stub.GetAudit(pb.GetAuditRequest(limit=limit or 0), timeout=RPC_TIMEOUT_S)
            return [convert.audit_from_pb(r) for r in reply.rows]
    return Governance.open(db, gov_dir=gov_dir).audit_rows(limit)


def audit_verify(*, router: str | None = None, db: str | None = None,
                 gov_dir: Path | None = None) -> VerifyResult:
    """Walk the audit hash chain."""
    if router:
        with _remote(router) as stub:
            reply = stub.GetAudit(pb.GetAuditRequest(limit=1, verify=True), timeout=RPC_TIMEOUT_S)
            return convert.verify_from_pb(reply.verification)
    return Governance.open(db, gov_dir=gov_dir, repair=False).verify_audit()  # report what it finds, change nothing


def phase_show(*, router: str | None = None, db: str | None = None,
               gov_dir: Path | None = None) -> PhaseInfo:
    """The current phase and what it enables."""
    if router:
        with _remote(router) as stub:
            reply = stub.GetPhase(pb.GetPhaseRequest(), timeout=RPC_TIMEOUT_S)
            rule = PhaseRule(description=reply.description, tiers=list(reply.tiers), features=list(reply.features))
            return PhaseInfo(phase=reply.phase, rule=rule)
    return Governance.open(db, gov_dir=gov_dir).phase()


def phase_propose(phase: int, *, key: str, rationale: str = "", router: str | None = None,
                  db: str | None = None, gov_dir: Path | None = None) -> ProposalView:
    """Sign with key and submit a set_phase proposal to the router or the local store."""
    msg = proposal_message(key, {"kind": PHASE_CHANGE_KIND, "target": "mesh", "params": {"phase": phase},
                                 "rationale": rationale or f"move the mesh to phase {phase}"})
    if router:
        with _remote(router) as stub:
            return convert.proposal_from_pb(stub.SubmitProposal(proposal_request(msg), timeout=RPC_TIMEOUT_S))
    return Governance.open(db, gov_dir=gov_dir).propose(msg)
