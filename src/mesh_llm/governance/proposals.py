"""Stored proposals and their votes; the quorum arithmetic that decides them."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, insert, select, update

from mesh_llm.governance.policy import TierRule
from mesh_llm.store.governance_tables import proposals, votes

log = logging.getLogger(__name__)

OPEN = "open"  # taking votes
APPROVED = "approved"  # quorum met; applied once its timelock passes and a handler is registered
ACCEPTED = "accepted"  # approved, but its tier never applies anything (read_only, suggest)
CLOSED = frozenset({ACCEPTED, "applying", "applied", "rejected", "failed", "reverted"})


class VotePayload(BaseModel):
    """Payload of a signed vote."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["vote"]
    proposal_id: int
    choice: Literal["approve", "reject"]


class ProposePayload(BaseModel):
    """Payload of a signed proposal (its author is the signer); the fields are checked again as a ProposalIn."""

    model_config = ConfigDict(extra="forbid")
    action: Literal["propose"]
    kind: str
    target: str
    params: dict = Field(default_factory=dict)
    rationale: str


@dataclass(frozen=True, kw_only=True)
class ProposalView:
    id: int  # proposal id
    kind: str  # action kind
    target: str  # what it acts on (router, mesh, an expert id)
    params: dict  # action parameters
    rationale: str  # why, in the proposer's words
    author: str  # who submitted it
    tier: str  # tier it was classified into
    tier_reason: str  # why that tier
    phase: int  # phase when submitted
    status: str  # open, approved, accepted, applying, applied, rejected, failed, reverted
    created_at: float  # unix seconds
    eligible_at: float  # earliest application time (timelock)
    decided_at: float | None  # when it was approved or rejected
    sandbox: str | None  # passed / failed / None
    votes: tuple[tuple[str, str], ...]  # (member, choice) in voting order
    required: int  # approvals needed

    @property
    def approvals(self) -> int:
        """Approve votes so far."""
        return sum(1 for _, c in self.votes if c == "approve")

    @property
    def rejections(self) -> int:
        """Reject votes so far."""
        return sum(1 for _, c in self.votes if c == "reject")


def decide(rule: TierRule, *, required: int, members: int, approvals: int, rejections: int,
           sandbox: str | None) -> str:
    """OPEN, APPROVED / ACCEPTED or 'rejected' for these votes under a tier rule."""
    if sandbox == "failed" or members - rejections < required:
        return "rejected"
    if approvals >= required and (not rule.sandbox or sandbox == "passed"):
        return APPROVED if rule.applies else ACCEPTED
    return OPEN


def insert_proposal(conn: Connection, **values) -> int:
    """Store a new proposal; return its id."""
    values["params"] = json.dumps(values["params"], sort_keys=True)
    return conn.execute(insert(proposals).values(**values)).inserted_primary_key[0]


def get(conn: Connection, proposal_id: int, required: int):
    """ProposalView of one proposal, or None."""
    row = conn.execute(select(proposals).where(proposals.c.id == proposal_id)).first()
    return None if row is None else _view(conn, row, required)


def listing(conn: Connection, required_of, status: str | None = None) -> list[ProposalView]:
    """Proposals, newest first, optionally of one status; required_of(tier) gives each quorum."""
    query = select(proposals).order_by(proposals.c.id.desc())
    if status:
        query = query.where(proposals.c.status == status)
    return [_view(conn, row, required_of(row.tier)) for row in conn.execute(query).all()]


def _view(conn: Connection, row, required: int) -> ProposalView:
    cast = conn.execute(select(votes.c.member, votes.c.choice).where(votes.c.proposal_id == row.id)
                        .order_by(votes.c.ts, votes.c.member)).all()
    data = dict(row._mapping)
    data["params"] = json.loads(data["params"])
    return ProposalView(**data, votes=tuple((m, c) for m, c in cast), required=required)


def add_vote(conn: Connection, *, proposal_id: int, member: str, choice: str, ts: float) -> None:
    """Store one member's vote."""
    conn.execute(insert(votes).values(proposal_id=proposal_id, member=member, choice=choice, ts=ts))


def set_status(conn: Connection, proposal_id: int, status: str, *, from_status: str | None = None,
               **extra) -> bool:
    """Change a proposal's status (only from from_status when given); False when it was not there."""
    query = update(proposals).where(proposals.c.id == proposal_id)
    if from_status is not None:
        query = query.where(proposals.c.status == from_status)
    return conn.execute(query.values(status=status, **extra)).rowcount == 1


def due(conn: Connection, now: float) -> list:
    """Approved proposals whose timelock has passed, oldest first."""
    return conn.execute(select(proposals).where(proposals.c.status == APPROVED, proposals.c.eligible_at <= now)
                        .order_by(proposals.c.id)).all()
