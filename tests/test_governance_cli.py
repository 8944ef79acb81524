"""CLI smoke test of the governance commands on a local store."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from mesh_llm.cli import governance_cmd

REPO_GOV = Path(__file__).resolve().parents[1] / "governance"


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    gov_dir = tmp_path / "governance"
    gov_dir.mkdir()
    shutil.copy(REPO_GOV / "policy.toml", gov_dir / "policy.toml")
    monkeypatch.setenv("MESH_GOVERNANCE_DIR", str(gov_dir))
    app = typer.Typer()
    governance_cmd.register(app)
    runner = CliRunner()
    db = f"sqlite:///{tmp_path / 'mesh.db'}"

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(app, list(args))
        assert result.exit_code == code, result.output
        return result.output

    return run, db, tmp_path / "mesh.db"


def test_governance_commands_end_to_end(cli):
    run, db, db_path = cli
    for name in ("alice", "bob"):
        pub = run("keys", "new", name).strip()
        assert "added" in run("members", "add", name, pub)
    assert "alice" in run("members", "list")
    assert "HALTED" in run("halt", "--reason", "runaway task", "--key", "alice", "--db", db)
    assert "resume votes 1/2" in run("resume", "--key", "alice", "--db", db)
    assert "already voted" in run("resume", "--key", "alice", "--db", db, code=1)
    assert "running" in run("resume", "--key", "bob", "--db", db)
    assert "not halted" in run("resume", "--key", "bob", "--db", db, code=1)
    assert "phase 1" in run("phase", "show", "--db", db)
    assert "deploy_major" in run("phase", "propose", "2", "--key", "alice", "--db", db)
    assert "#1 open" in run("proposals", "list", "--db", db)
    assert "votes 1+/0-" in run("vote", "1", "approve", "--key", "bob", "--db", db)
    assert "bob: approve" in run("proposals", "show", "1", "--db", db)
    assert "no proposal 99" in run("vote", "99", "approve", "--key", "alice", "--db", db, code=1)
    assert "mesh keys new carol" in run("halt", "--reason", "x", "--key", "carol", "--db", db, code=1)
    shown = run("audit", "show", "--db", db)
    assert "halt" in shown and "refused" in shown
    assert "audit chain ok" in run("audit", "verify", "--db", db)
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE gov_audit SET detail = '{}' WHERE seq = 2")
    assert "BROKEN at row 2" in run("audit", "verify", "--db", db, code=1)


def test_missing_policy_is_a_clear_error(cli, tmp_path, monkeypatch):
    run, db, _ = cli
    monkeypatch.setenv("MESH_GOVERNANCE_DIR", str(tmp_path / "nowhere"))
    assert "no policy.toml" in run("audit", "verify", "--db", db, code=1)
