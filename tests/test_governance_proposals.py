"""Proposals: tiers from kind and bounds, phase gating, quorum and timelock arithmetic, actions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh_llm.governance.actions import ActionRegistry
from mesh_llm.governance.errors import (
    ActionError,
    DoubleVote,
    InvalidProposal,
    PhaseForbidden,
    ProposalClosed,
    UnknownProposal,
)
from mesh_llm.governance.policy import load_policy
from mesh_llm.governance.tiers import Bound, ProposalIn, Tier
from mesh_llm.testing.governance import manual_governance, open_governance

POLICY = load_policy(Path(__file__).resolve().parents[1] / "governance" / "policy.toml")
DAY = 86400.0


def _setter(settings: dict, name: str):
    def apply(target: str, params: dict) -> dict:
        old = settings.get(name)
        settings[name] = params[name]
        return {name: old}
    return apply


@pytest.fixture
def mesh(tmp_path, monkeypatch):
    """Governance in phase 2 with three members and a router-like settings dict."""
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    settings = {"k": 2, "policy": "random"}
    registry = ActionRegistry()
    registry.register("set_default_k", _setter(settings, "k"))
    registry.register("set_selection_policy", _setter(settings, "policy"))
    policy = POLICY.model_copy(update={"initial_phase": 2})
    gov, signers, clock = manual_governance(tmp_path / "gov.db", policy, registry=registry)
    return gov, signers, clock, settings


def _propose(gov, kind="set_default_k", target="router", **params):
    return gov.submit({"kind": kind, "target": target, "params": params, "rationale": "test"}, author="agent")


@pytest.mark.parametrize(("kind", "target", "params", "tier"), [
    ("set_default_k", "router", {"k": 4}, Tier.DEPLOY_MINOR),
    ("set_default_k", "router", {"k": 100}, Tier.DEPLOY_MAJOR),  # outside declared bounds
    ("set_default_k", "router", {"k": True}, Tier.DEPLOY_MAJOR),  # a bool is not an int
    ("set_default_k", "router", {"k": 4, "force": 1}, Tier.DEPLOY_MAJOR),  # undeclared parameter
    ("set_default_k", "router", {}, Tier.DEPLOY_MAJOR),  # missing parameter
    ("set_default_k", "expert-1", {"k": 4}, Tier.DEPLOY_MAJOR),  # wrong target
    ("set_selection_policy", "router", {"policy": "latency"}, Tier.DEPLOY_MINOR),
    ("set_selection_policy", "router", {"policy": "yolo"}, Tier.DEPLOY_MAJOR),
    ("set_expert_weight", "expert-1", {"weight": 1.5}, Tier.SANDBOX_TEST),
    ("quarantine_expert", "expert-1", {"quarantined": True}, Tier.DEPLOY_MINOR),
    ("set_step_deadline", "router", {"seconds": 0.5}, Tier.DEPLOY_MINOR),
    ("observe", "mesh", {"what": "rtt"}, Tier.READ_ONLY),
    ("note", "router", {"text": "try K=3"}, Tier.SUGGEST),
    ("rewrite_router", "router", {}, Tier.DEPLOY_MAJOR),  # unknown kind
])
def test_tier_comes_from_kind_and_bounds(kind, target, params, tier):
    proposal = ProposalIn(kind=kind, target=target, params=params, rationale="r")
    assert ActionRegistry().classify(proposal)[0] is tier


def test_deploy_minor_needs_two_of_three_then_applies_and_records_inverse(mesh):
    gov, signers, _, settings = mesh
    p = _propose(gov, k=4)
    assert (p.tier, p.status, p.required) == ("deploy_minor", "open", 2)
    assert gov.vote(signers.vote("alice", p.id)).status == "open"
    assert settings["k"] == 2
    assert gov.vote(signers.vote("bob", p.id)).status == "applied"
    assert settings["k"] == 4
    applied = [json.loads(r.detail) for r in gov.audit_rows() if r.event == "action_applied"]
    assert applied[0]["inverse"] == {"k": 2}


def test_two_rejections_of_three_reject(mesh):
    gov, signers, _, settings = mesh
    p = _propose(gov, k=4)
    gov.vote(signers.vote("alice", p.id, "reject"))
    assert gov.vote(signers.vote("bob", p.id, "reject")).status == "rejected"
    assert settings["k"] == 2


def test_deploy_major_timelock_is_enforced_by_the_clock(mesh, tmp_path):
    gov, signers, clock, settings = mesh
    gov.policy = gov.policy.model_copy(update={"initial_phase": 3})  # phase 3 allows deploy_major
    p = _propose(gov, k=32)  # out of bounds: deploy_major
    assert (p.tier, p.required, p.eligible_at - p.created_at) == ("deploy_major", 2, DAY)
    gov.vote(signers.vote("alice", p.id))
    assert gov.vote(signers.vote("carol", p.id)).status == "approved"
    clock.advance(DAY - 1)
    assert gov.apply_due() == [] and settings["k"] == 2
    clock.advance(1)
    assert gov.apply_due() == [p.id] and settings["k"] == 32
    assert gov.proposal(p.id).status == "applied"


def test_phase_gates_tiers_and_refusals_are_audited(mesh, tmp_path):
    _, signers, clock, _ = mesh
    gov = open_governance(tmp_path / "p1.db", POLICY, signers, clock=clock)  # phase 1
    with pytest.raises(PhaseForbidden, match="phase 1 allows only"):
        _propose(gov, k=4)
    assert _propose(gov, kind="observe", target="mesh", what="rtt").status == "accepted"  # automatic
    note = _propose(gov, kind="note", target="router", text="try K=3")
    assert (note.tier, note.status) == ("suggest", "open")
    assert gov.vote(signers.vote("bob", note.id)).status == "accepted"  # reviewed; nothing applied
    assert [json.loads(r.detail)["error"] for r in gov.audit_rows() if r.event == "refused"] == ["PhaseForbidden"]
    assert [p.kind for p in gov.proposals()] == ["note", "observe"]


def test_bad_votes_are_refused_audited_and_change_nothing(mesh):
    gov, signers, _, _ = mesh
    p = _propose(gov, k=4)
    gov.vote(signers.vote("alice", p.id))
    with pytest.raises(DoubleVote):
        gov.vote(signers.vote("alice", p.id, "reject"))
    with pytest.raises(UnknownProposal):
        gov.vote(signers.vote("bob", 999))
    gov.vote(signers.vote("bob", p.id))
    with pytest.raises(ProposalClosed):
        gov.vote(signers.vote("carol", p.id))
    with pytest.raises(InvalidProposal):
        gov.submit({"kind": "set_default_k", "target": "router", "params": {"k": 4}}, author="agent")
    assert gov.proposal(p.id).votes == (("alice", "approve"), ("bob", "approve"))
    refused = [json.loads(r.detail)["error"] for r in gov.audit_rows() if r.event == "refused"]
    assert refused == ["DoubleVote", "UnknownProposal", "ProposalClosed", "InvalidProposal"]
    assert gov.verify_audit().ok


def test_phase_transition_is_a_full_vote_with_timelock(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    gov, signers, clock = manual_governance(tmp_path / "gov.db", POLICY)
    assert gov.phase().phase == 1
    p = gov.propose_phase(2, author="alice")
    assert p.tier == "deploy_major"
    gov.vote(signers.vote("alice", p.id))
    gov.vote(signers.vote("bob", p.id))
    assert gov.phase().phase == 1
    clock.advance(DAY)
    gov.apply_due()
    assert gov.phase().phase == 2
    assert _propose(gov, k=4).tier == "deploy_minor"  # now allowed


def test_sandbox_tier_needs_a_pass_and_a_spot_check_and_regression_rolls_back(mesh):
    gov, signers, _, _ = mesh
    weights = {}
    gov.registry.register("set_expert_weight", _setter(weights, "weight"))
    p = _propose(gov, kind="set_expert_weight", target="e1", weight=0.5)
    assert gov.vote(signers.vote("alice", p.id)).status == "open"  # spot-check alone is not enough
    assert gov.record_sandbox(p.id, passed=True, detail="nll ok").status == "applied"
    assert weights == {"weight": 0.5}
    assert gov.report_regression(p.id, detail="nll +0.3").status == "reverted"
    assert weights == {"weight": None}


def test_handlers_registered_later_and_new_kinds_declare_bounds(mesh):
    gov, signers, clock, _ = mesh
    p = _propose(gov, kind="set_step_deadline", seconds=0.5)
    gov.vote(signers.vote("alice", p.id))
    assert gov.vote(signers.vote("bob", p.id)).status == "approved"  # no handler yet
    deadlines = {}
    gov.registry.register("set_step_deadline", _setter(deadlines, "seconds"))
    assert gov.apply_due() == [p.id] and deadlines == {"seconds": 0.5}
    with pytest.raises(ActionError):
        gov.registry.register("set_draft_len", _setter(deadlines, "n"))
    gov.registry.register("set_draft_len", _setter(deadlines, "n"), tier=Tier.DEPLOY_MINOR, target="router",
                          bounds={"n": Bound(type="int", low=0, high=8)})
    assert _propose(gov, kind="set_draft_len", n=4).tier == "deploy_minor"
    with pytest.raises(PhaseForbidden, match="deploy_major"):  # out of bounds: not allowed in phase 2
        _propose(gov, kind="set_draft_len", n=40)


def test_oversized_proposals_are_refused_and_audited(mesh):
    gov, _, _, _ = mesh
    oversized = [{"kind": "note", "target": "router", "params": {"text": "ok"}, "rationale": "r" * 8001},
                 {"kind": "note", "target": "t" * 257, "params": {"text": "ok"}, "rationale": "r"},
                 {"kind": "n" * 65, "target": "router", "params": {}, "rationale": "r"}]
    for proposal in oversized:
        with pytest.raises(InvalidProposal, match="proposal field"):
            gov.submit(proposal, author="agent")
    refused = [json.loads(r.detail) for r in gov.audit_rows() if r.event == "refused"]
    assert [r["error"] for r in refused] == ["InvalidProposal"] * 3
    assert all(len(r["message"]) < 300 for r in refused)  # the audit keeps the reason, not the oversized text
    assert gov.proposals() == [] and gov.verify_audit().ok
