"""Policy and members files, and the key store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh_llm.governance import keys
from mesh_llm.governance.errors import KeyStoreError, MemberError, PolicyError
from mesh_llm.governance.policy import add_member, load_members, load_policy
from mesh_llm.governance.tiers import Tier

REPO_POLICY = Path(__file__).resolve().parents[1] / "governance" / "policy.toml"


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))


def test_repo_policy_loads_with_five_tiers_and_four_phases():
    policy = load_policy(REPO_POLICY)
    assert set(policy.tiers) == set(Tier)
    assert sorted(policy.phases) == [0, 1, 2, 3]
    assert policy.tiers[Tier.DEPLOY_MAJOR].timelock_s == 86400
    assert policy.kill_switch.revert_last == 3
    assert policy.required(policy.tiers[Tier.DEPLOY_MINOR].approvals, 3) == 2
    assert policy.required("majority", 5) == 3 and policy.required("all", 4) == 4
    assert policy.required(2, 1) == 1  # capped at the membership
    assert load_members(REPO_POLICY.with_name("members.toml")) == []


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.replace("approvals = 2", "approvals = -2"), "tiers.deploy_minor.approvals"),
    (lambda t: t.replace("revert_last = 3", "revert_lst = 3"), "kill_switch.revert_lst"),
    (lambda t: t.replace('[tiers.suggest]', '[tiers.sugest]'), "tiers.sugest"),
    (lambda t: t.replace('tiers = ["read_only", "suggest"]\nfeatures = ["single_model"]',
                         'tiers = ["read_only", "bogus"]'), "phases.0.tiers.1"),
    (lambda t: t.replace("[phases.3]", "[phases.4]"), "phases must be exactly"),
    (lambda t: t + "\n[oops\n", "not valid TOML"),
])
def test_malformed_policy_names_the_bad_field(tmp_path, edit, message):
    bad = tmp_path / "policy.toml"
    bad.write_text(edit(REPO_POLICY.read_text()))
    with pytest.raises(PolicyError, match=message.replace(".", r"\.").replace("[", r"\[")):
        load_policy(bad)


def test_members_add_validates_and_refuses_duplicates(tmp_path):
    path = tmp_path / "members.toml"
    pub = keys.new_key("alice")
    add_member(path, "alice", pub)
    assert [m.name for m in load_members(path)] == ["alice"]
    with pytest.raises(MemberError, match="already a member"):
        add_member(path, "alice", keys.new_key("alice2"))
    with pytest.raises(MemberError, match="already belongs"):
        add_member(path, "bob", pub)
    with pytest.raises(MemberError, match="32 bytes"):
        add_member(path, "carol", "AAAA")
    with pytest.raises(MemberError):
        add_member(path, 'x"; evil = 1', keys.new_key("x"))
    assert [m.name for m in load_members(path)] == ["alice"]


def test_members_file_errors_are_clear(tmp_path):
    path = tmp_path / "members.toml"
    path.write_text('[[member]]\nname = "a"\npublic_key = "not-base64!"\n')
    with pytest.raises(PolicyError, match=r"member\.0\.public_key"):
        load_members(path)


def test_keys_are_private_and_loadable(tmp_path):
    pub = keys.new_key("alice")
    path = tmp_path / "home" / "keys" / "alice.key"
    assert path.stat().st_mode & 0o777 == 0o600
    assert keys.public_key_b64(keys.load_key("alice")) == pub
    with pytest.raises(KeyStoreError, match="already exists"):
        keys.new_key("alice")
    with pytest.raises(KeyStoreError, match="mesh keys new bob"):
        keys.load_key("bob")
    os.chmod(path, 0o644)
    with pytest.raises(KeyStoreError, match="readable by others"):
        keys.load_key("alice")
    with pytest.raises(KeyStoreError, match="bad key name"):
        keys.key_path("../etc")


def test_packaged_default_policy_is_the_repository_policy_and_seeds_mesh_home(tmp_path, monkeypatch):
    from pathlib import Path

    from mesh_llm.governance.policy import governance_dir, load_policy

    repo_policy = Path(__file__).parents[1] / "governance" / "policy.toml"
    packaged = Path(__file__).parents[1] / "src" / "mesh_llm" / "governance" / "default_policy.toml"
    assert packaged.read_text() == repo_policy.read_text()
    monkeypatch.delenv("MESH_GOVERNANCE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    folder = governance_dir()
    from mesh_llm.paths import mesh_home

    assert folder == mesh_home() / "governance"
    assert load_policy(folder / "policy.toml").initial_phase == 1
