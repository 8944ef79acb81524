"""The audit hash chain: verify names the first edited, deleted or reordered row."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from mesh_llm.governance.errors import MeshHalted, NotHalted
from mesh_llm.governance.policy import load_policy
from mesh_llm.testing.governance import manual_governance

POLICY = load_policy(Path(__file__).resolve().parents[1] / "governance" / "policy.toml")


@pytest.fixture
def gov(tmp_path, monkeypatch):
    """Governance with six audit rows: a refusal, a halt, resume votes, then another halt and refusal."""
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    gov, signers, clock = manual_governance(tmp_path / "gov.db", POLICY)
    with pytest.raises(NotHalted):
        gov.resume(signers.resume("alice"))
    for step in (signers.halt("alice"), signers.resume("bob"), signers.resume("carol"), signers.halt("bob")):
        clock.advance(1)
        (gov.halt if '"halt"' in step.payload else gov.resume)(step)
    with pytest.raises(MeshHalted):
        gov.submit({"kind": "note", "target": "mesh", "params": {"text": "x"}, "rationale": "r"}, author="agent")
    assert [r.event for r in gov.audit_rows()] == ["refused", "halt", "resume_vote", "resumed", "halt", "refused"]
    assert gov.verify_audit().ok and gov.verify_audit().checked == 6
    return gov


def _sql(gov, statement: str) -> None:
    with gov.engine.begin() as conn:
        conn.execute(text(statement))


def test_edited_row_is_named(gov):
    _sql(gov, "UPDATE gov_audit SET actor = 'mallory' WHERE seq = 3")
    result = gov.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 3) and "edited" in result.problem


def test_deleted_middle_row_is_named(gov):
    _sql(gov, "DELETE FROM gov_audit WHERE seq = 2")
    result = gov.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 3)


def test_deleted_last_row_is_detected(gov):
    _sql(gov, "DELETE FROM gov_audit WHERE seq = 6")
    result = gov.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 6) and "end" in result.problem


def test_reordered_rows_are_named(gov):
    _sql(gov, "UPDATE gov_audit SET seq = -1 WHERE seq = 4")
    _sql(gov, "UPDATE gov_audit SET seq = 4 WHERE seq = 5")
    _sql(gov, "UPDATE gov_audit SET seq = 5 WHERE seq = -1")
    result = gov.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 4)


def test_recomputed_hash_still_breaks_the_link(gov):
    from mesh_llm.governance.audit import row_hash

    row = gov.audit_rows()[1]
    forged = row_hash(row.prev_hash, row.seq, row.ts, row.event, "mallory", row.detail)
    _sql(gov, f"UPDATE gov_audit SET actor = 'mallory', hash = '{forged}' WHERE seq = 2")
    result = gov.verify_audit()
    assert (result.ok, result.first_bad_seq) == (False, 3)
