"""Kill switch: persisted halts, revert of the last N actions, read-only mode, resume quorum (the router's own streams stop in tests/test_router_governance.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from mesh_llm.governance.actions import ActionRegistry
from mesh_llm.governance.errors import DoubleVote, MeshHalted, NotHalted
from mesh_llm.governance.policy import load_policy
from mesh_llm.testing.governance import ManualClock, make_signers, open_governance

POLICY = load_policy(Path(__file__).resolve().parents[1] / "governance" / "policy.toml").model_copy(
    update={"initial_phase": 2})


class Router:
    """A stand-in for the router's settings, changed only through registered handlers."""

    def __init__(self) -> None:
        self.k = 1

    def set_k(self, _target: str, params: dict) -> dict:
        old, self.k = self.k, params["k"]
        return {"k": old}

    def registry(self) -> ActionRegistry:
        registry = ActionRegistry()
        registry.register("set_default_k", self.set_k)
        return registry


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    clock = ManualClock()
    signers = make_signers(["alice", "bob", "carol"], clock)
    router = Router()

    def reopen(with_handlers: bool = True, target: Router | None = None):
        registry = (target or router).registry() if with_handlers else None
        return open_governance(tmp_path / "gov.db", POLICY, signers, clock=clock, registry=registry)

    return reopen, signers, router


def _apply_k(gov, signers, k: int) -> int:
    p = gov.submit({"kind": "set_default_k", "target": "router", "params": {"k": k}, "rationale": "r"}, author="a")
    gov.vote(signers.vote("alice", p.id))
    assert gov.vote(signers.vote("bob", p.id)).status == "applied"
    return p.id


def test_halt_persists_across_reopening_the_store(env):
    reopen, signers, _ = env
    gov = reopen()
    state = gov.halt(signers.halt("carol", "runaway task"))
    assert state.halted and state.halted_by == "carol" and gov.switch.is_halted
    again = reopen()
    assert again.switch.is_halted and again.switch.reason == "runaway task"
    with pytest.raises(MeshHalted, match="runaway task"):
        again.switch.check()


def test_halt_reverts_the_last_three_actions_newest_first(env):
    reopen, signers, router = env
    gov = reopen()
    ids = [_apply_k(gov, signers, k) for k in (2, 3, 4, 5, 6)]
    assert router.k == 6
    gov.halt(signers.halt("alice"))
    assert router.k == 3  # 6 -> 5 -> 4 -> 3
    assert [gov.proposal(i).status for i in ids] == ["applied", "applied", "reverted", "reverted", "reverted"]
    reverted = [json.loads(r.detail)["inverse"] for r in gov.audit_rows() if r.event == "action_reverted"]
    assert reverted == [{"k": 5}, {"k": 4}, {"k": 3}]


def test_revert_recorded_by_another_process_runs_when_the_handler_registers(env):
    reopen, signers, router = env
    gov = reopen()
    _apply_k(gov, signers, 7)
    cli = reopen(with_handlers=False)  # e.g. `mesh halt` on the local store: no router handlers
    cli.halt(signers.halt("bob"))
    assert router.k == 7
    restarted = Router()
    restarted.k = 7
    reopen(target=restarted)  # the router restarts and registers its handlers
    assert restarted.k == 1


def test_halted_mesh_is_read_only(env):
    reopen, signers, router = env
    gov = reopen()
    p = gov.submit({"kind": "set_default_k", "target": "router", "params": {"k": 3}, "rationale": "r"}, author="a")
    gov.vote(signers.vote("alice", p.id))
    gov.halt(signers.halt("carol"))
    assert gov.vote(signers.vote("bob", p.id)).status == "approved"  # counted, not applied
    assert router.k == 1 and gov.apply_due() == []
    with pytest.raises(MeshHalted):
        gov.submit({"kind": "set_default_k", "target": "router", "params": {"k": 4}, "rationale": "r"}, author="a")
    observe = {"kind": "observe", "target": "mesh", "params": {"what": "load"}, "rationale": "r"}
    assert gov.submit(observe, author="a").status == "accepted"


def test_only_a_resume_quorum_lifts_the_halt(env):
    reopen, signers, _ = env
    gov = reopen()
    events = []
    gov.switch.add_listener(lambda halted, reason: events.append((halted, reason)))
    with pytest.raises(NotHalted):
        gov.resume(signers.resume("alice"))
    gov.halt(signers.halt("alice", "stop"))
    assert gov.resume(signers.resume("alice")).halted  # 1 of 2
    with pytest.raises(DoubleVote):
        gov.resume(signers.resume("alice"))
    other = reopen()
    assert other.switch.is_halted
    state = gov.resume(signers.resume("carol"))
    assert not state.halted and not gov.switch.is_halted
    assert events == [(True, "stop"), (False, "")]
    assert other.refresh().halted is False and not other.switch.is_halted  # seen by another process
    refused = [json.loads(r.detail)["error"] for r in gov.audit_rows() if r.event == "refused"]
    assert refused == ["NotHalted", "DoubleVote"]


async def test_watch_follows_a_halt_made_by_another_process(env):
    reopen, signers, _ = env
    router_side = reopen()
    watcher = asyncio.create_task(router_side.watch(interval_s=0.05))
    try:
        reopen(with_handlers=False).halt(signers.halt("alice", "from the cli"))
        assert await asyncio.wait_for(router_side.switch.wait_halted(), timeout=1.0) == "from the cli"
    finally:
        watcher.cancel()
