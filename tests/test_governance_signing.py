"""Signed messages: forgeries, unknown signers, stale timestamps and replays are refused and counted in the audit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mesh_llm.governance.errors import BadSignature, InvalidMessage, ReplayedNonce, StaleMessage, UnknownSigner
from mesh_llm.governance.policy import load_policy
from mesh_llm.testing.governance import make_signers, manual_governance, open_governance

POLICY = load_policy(Path(__file__).resolve().parents[1] / "governance" / "policy.toml")


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    return manual_governance(tmp_path / "gov.db", POLICY)


def _refusals(gov):
    """Reasons of the unauthenticated refusals: counted per window in one grouped row, so close the window first."""
    gov.flush_refusals(force=True)
    found = []
    for row in gov.audit_rows():
        if row.event == "refused_unauthenticated":
            for key, count in json.loads(row.detail)["by"].items():
                found += [key.split(":")[1]] * count
    return found


def test_forged_signature_is_refused_audited_and_changes_nothing(setup):
    gov, signers, _ = setup
    msg = signers.halt("alice")
    forged = dataclasses.replace(msg, payload=json.dumps({"action": "halt", "reason": "something else"}))
    with pytest.raises(BadSignature):
        gov.halt(forged)
    mallory = make_signers(["alice"]).halt("alice")  # right name, wrong key
    with pytest.raises(BadSignature):
        gov.halt(mallory)
    assert not gov.halt_state().halted and not gov.switch.is_halted
    assert _refusals(gov) == ["BadSignature", "BadSignature"]
    assert gov.verify_audit().ok


def test_unknown_signer_refused(setup):
    gov, _, clock = setup
    with pytest.raises(UnknownSigner):
        gov.halt(make_signers(["mallory"], clock).halt("mallory"))
    assert not gov.halt_state().halted
    assert _refusals(gov) == ["UnknownSigner"]


def test_stale_and_future_messages_refused(setup):
    gov, signers, clock = setup
    old = signers.halt("alice")
    clock.advance(POLICY.signatures.max_skew_s + 1)
    with pytest.raises(StaleMessage):
        gov.halt(old)
    future = signers.halt("bob")
    clock.advance(-2 * (POLICY.signatures.max_skew_s + 1))
    with pytest.raises(StaleMessage):
        gov.halt(future)
    assert not gov.halt_state().halted
    assert _refusals(gov) == ["StaleMessage", "StaleMessage"]


def test_replayed_nonce_refused_even_in_a_new_process(setup, tmp_path):
    gov, signers, clock = setup
    halt = signers.halt("alice")
    gov.halt(halt)
    resume = signers.resume("bob")
    gov.resume(resume)
    with pytest.raises(ReplayedNonce):
        gov.resume(resume)  # same message again
    reopened = open_governance(tmp_path / "gov.db", POLICY, signers, clock=clock)
    with pytest.raises(ReplayedNonce):
        reopened.resume(resume)
    assert reopened.halt_state().resume_votes == ("bob",)
    gov.flush_refusals(force=True)  # each process counts its own refusals
    assert _refusals(reopened) == ["ReplayedNonce", "ReplayedNonce"]


def test_message_for_another_operation_refused(setup):
    gov, signers, _ = setup
    with pytest.raises(InvalidMessage):
        gov.halt(signers.resume("alice"))  # a signed resume is not a halt
    with pytest.raises(InvalidMessage):
        gov.vote(signers.msg("alice", {"action": "vote", "proposal_id": 1, "choice": "maybe"}))
    assert not gov.halt_state().halted
