"""Conversions between governance views and their protobuf messages."""

from __future__ import annotations

import json

from mesh_llm.governance.audit import AuditRow, VerifyResult
from mesh_llm.governance.killswitch import HaltState
from mesh_llm.governance.proposals import ProposalView
from mesh_llm.governance.signing import SignedMessage
from mesh_llm.pb import governance_pb2 as pb


def signed_to_pb(msg: SignedMessage) -> pb.SignedMessage:
    """SignedMessage as a protobuf message."""
    return pb.SignedMessage(signer=msg.signer, payload=msg.payload, nonce=msg.nonce, timestamp=msg.timestamp,
                            signature=msg.signature)


def signed_from_pb(msg: pb.SignedMessage) -> SignedMessage:
    """SignedMessage from its protobuf message."""
    return SignedMessage(signer=msg.signer, payload=msg.payload, nonce=msg.nonce, timestamp=msg.timestamp,
                         signature=bytes(msg.signature))


def halt_to_pb(state: HaltState) -> pb.HaltState:
    """HaltState as a protobuf message."""
    return pb.HaltState(halted=state.halted, halt_id=state.halt_id or 0, reason=state.reason,
                        halted_by=state.halted_by, halted_at=state.halted_at or 0.0,
                        resume_votes=list(state.resume_votes), resume_required=state.resume_required)


def halt_from_pb(msg: pb.HaltState) -> HaltState:
    """HaltState from its protobuf message."""
    return HaltState(halted=msg.halted, halt_id=msg.halt_id or None, reason=msg.reason, halted_by=msg.halted_by,
                     halted_at=msg.halted_at or None, resume_votes=tuple(msg.resume_votes),
                     resume_required=msg.resume_required)


def proposal_to_pb(view: ProposalView) -> pb.ProposalRecord:
    """ProposalView as a protobuf message."""
    return pb.ProposalRecord(
        id=view.id, kind=view.kind, target=view.target, params_json=json.dumps(view.params, sort_keys=True),
        rationale=view.rationale, author=view.author, tier=view.tier, tier_reason=view.tier_reason, phase=view.phase,
        status=view.status, created_at=view.created_at, eligible_at=view.eligible_at,
        decided_at=view.decided_at or 0.0, sandbox=view.sandbox or "",
        votes=[pb.Vote(member=m, choice=c) for m, c in view.votes], required=view.required)


def proposal_from_pb(msg: pb.ProposalRecord) -> ProposalView:
    """ProposalView from its protobuf message."""
    return ProposalView(
        id=msg.id, kind=msg.kind, target=msg.target, params=json.loads(msg.params_json or "{}"),
        rationale=msg.rationale, author=msg.author, tier=msg.tier, tier_reason=msg.tier_reason, phase=msg.phase,
        status=msg.status, created_at=msg.created_at, eligible_at=msg.eligible_at,
        decided_at=msg.decided_at or None, sandbox=msg.sandbox or None,
        votes=tuple((v.member, v.choice) for v in msg.votes), required=msg.required)


def audit_to_pb(row: AuditRow) -> pb.AuditRecord:
    """AuditRow as a protobuf message."""
    return pb.AuditRecord(seq=row.seq, ts=row.ts, event=row.event, actor=row.actor, detail_json=row.detail,
                          prev_hash=row.prev_hash, hash=row.hash)


def audit_from_pb(msg: pb.AuditRecord) -> AuditRow:
    """AuditRow from its protobuf message."""
    return AuditRow(seq=msg.seq, ts=msg.ts, event=msg.event, actor=msg.actor, detail=msg.detail_json,
                    prev_hash=msg.prev_hash, hash=msg.hash)


def verify_to_pb(result: VerifyResult) -> pb.AuditVerification:
    """VerifyResult as a protobuf message."""
    return pb.AuditVerification(ok=result.ok, checked=result.checked, first_bad_seq=result.first_bad_seq or 0,
                                problem=result.problem, mismatches=list(result.mismatches))


def verify_from_pb(msg: pb.AuditVerification) -> VerifyResult:
    """VerifyResult from its protobuf message."""
    return VerifyResult(ok=msg.ok, checked=msg.checked, first_bad_seq=msg.first_bad_seq or None, problem=msg.problem,
                        mismatches=tuple(msg.mismatches))
