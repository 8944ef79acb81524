"""Governance wired into the router: the kill switch stops real streams, actions change real settings."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from mesh_llm.cli import governance_cmd
from mesh_llm.governance import convert, keys
from mesh_llm.governance.policy import add_member
from mesh_llm.governance.signing import sign
from mesh_llm.grpc_util import channel
from mesh_llm.node import RouterConfig
from mesh_llm.pb import governance_pb2 as gpb
from mesh_llm.pb import governance_pb2_grpc as gpb_grpc
from mesh_llm.pb import router_pb2
from tests.mesh_helpers import local_mesh

REPO_GOV = Path(__file__).resolve().parents[1] / "governance"
PROMPT = "The capital of France is"
MEMBERS = ("alice", "bob", "carol")


def _gov_dir(tmp_path: Path, phase: int) -> Path:
    """A governance folder with the repository's policy (starting in `phase`) and three members with keys."""
    folder = tmp_path / "governance"
    folder.mkdir()
    text = (REPO_GOV / "policy.toml").read_text()
    assert "initial_phase = 1" in text
    (folder / "policy.toml").write_text(text.replace("initial_phase = 1", f"initial_phase = {phase}"))
    for name in MEMBERS:
        add_member(folder / "members.toml", name, keys.new_key(name))
    return folder


def _signed(name: str, payload: dict, *, key_of: str | None = None) -> gpb.SignedMessage:
    return convert.signed_to_pb(sign(keys.load_key(key_of or name), name, payload))


def _halt(name: str, reason: str = "test halt", **kw) -> gpb.SignedMessage:
    return _signed(name, {"action": "halt", "reason": reason}, **kw)


def _resume(name: str) -> gpb.SignedMessage:
    return _signed(name, {"action": "resume"})


def _config(tmp_path: Path, gov_dir: Path, **kw) -> RouterConfig:
    return RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret", governance_dir=gov_dir,
                        governance_poll_s=0.05, **kw)


async def _stream(stub, started: asyncio.Event | None = None, **fields):
    """Consume one Generate stream; return (token count, GenerationDone, monotonic end time)."""
    tokens = 0
    done = None
    async for event in stub.Generate(router_pb2.GenerateRequest(prompt=PROMPT, **fields), timeout=60):
        if event.HasField("token"):
            tokens += 1
            if started is not None:
                started.set()
        else:
            done = event.done
    return tokens, done, time.perf_counter()


@pytest.fixture
def gov_dir(tmp_path) -> Path:
    return _gov_dir(tmp_path, phase=1)


@pytest.mark.parametrize("drafted", [False, True])
async def test_halt_stops_every_stream_and_refuses_new_ones(tiny_loaded, tiny_model_dir, tmp_path, gov_dir, drafted):
    draft = f"model:{tiny_model_dir}" if drafted else ""
    async with local_mesh([tiny_loaded] * 2, tmp_path, _config(tmp_path, gov_dir), delay_ms=20) as mesh:
        async with channel(mesh.router.address) as ch:
            gov = gpb_grpc.GovernanceStub(ch)
            started = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.create_task(_stream(mesh.stub, s, k=2, max_tokens=200, draft=draft)) for s in started]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 20)
            sent = time.perf_counter()
            state = await gov.HaltMesh(_halt("carol", "runaway task"))
            results = await asyncio.wait_for(asyncio.gather(*streams), 5)
            assert state.halted and state.halted_by == "carol"
            assert [done.finish_reason for _, done, _ in results] == ["halted"] * 4
            assert all(0 < tokens < 200 for tokens, _, _ in results)
            assert max(end for _, _, end in results) - sent < 1.0  # the router's own streams, within a second

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await mesh.generate(prompt=PROMPT, max_tokens=4)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "halted (runaway task)" in refused.value.details() and "mesh resume" in refused.value.details()
            status = await mesh.stub.GetRouterStatus(router_pb2.RouterStatusRequest())
            assert status.halted and status.halt_reason == "runaway task" and status.phase == 1
            assert status.active_generations == 0


async def test_halt_survives_restart_and_a_resume_quorum_lifts_it(tiny_loaded, tmp_path, gov_dir):
    config = _config(tmp_path, gov_dir)
    async with local_mesh([], tmp_path, config) as mesh:  # no experts: a restart would list them for 5 s
        async with channel(mesh.router.address) as ch:
            await gpb_grpc.GovernanceStub(ch).HaltMesh(_halt("alice", "before restart"))
    async with local_mesh([tiny_loaded], tmp_path, config) as mesh:
        assert mesh.router.governance.switch.is_halted
        status = await mesh.stub.GetRouterStatus(router_pb2.RouterStatusRequest())
        assert status.halted and status.halt_reason == "before restart"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.generate(prompt=PROMPT, max_tokens=4)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        async with channel(mesh.router.address) as ch:
            gov = gpb_grpc.GovernanceStub(ch)
            assert (await gov.ResumeMesh(_resume("bob"))).halted  # 1 of 2
            with pytest.raises(grpc.aio.AioRpcError):
                await mesh.generate(prompt=PROMPT, max_tokens=4)
            with pytest.raises(grpc.aio.AioRpcError) as double:
                await gov.ResumeMesh(_resume("bob"))
            assert double.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert not (await gov.ResumeMesh(_resume("carol"))).halted
        _, done = await mesh.generate(prompt=PROMPT, max_tokens=4, k=1)
        assert done.finish_reason in ("length", "eos") and done.completion_tokens >= 1
        assert not (await mesh.stub.GetRouterStatus(router_pb2.RouterStatusRequest())).halted


async def test_forged_halt_is_refused_while_generation_continues(tiny_loaded, tmp_path, gov_dir):
    async with local_mesh([tiny_loaded], tmp_path, _config(tmp_path, gov_dir), delay_ms=10) as mesh:
        async with channel(mesh.router.address) as ch:
            gov = gpb_grpc.GovernanceStub(ch)
            started = asyncio.Event()
            stream = asyncio.create_task(_stream(mesh.stub, started, k=1, max_tokens=30))
            await asyncio.wait_for(started.wait(), 20)
            with pytest.raises(grpc.aio.AioRpcError) as forged:
                await gov.HaltMesh(_halt("alice", "forged", key_of="bob"))  # bob's key, alice's name
            assert forged.value.code() == grpc.StatusCode.UNAUTHENTICATED
            keys.new_key("mallory")
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await gov.HaltMesh(_halt("mallory"))
            assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
            tokens, done, _ = await asyncio.wait_for(stream, 30)
            assert done.finish_reason in ("length", "eos") and tokens >= 2
            assert not mesh.router.governance.switch.is_halted
            audit = await gov.GetAudit(gpb.GetAuditRequest(verify=True))
            assert [r.event for r in audit.rows] == [] and audit.verification.ok  # counted until the window closes
            assert mesh.router.governance.flush_refusals(force=True) == 2
            audit = await gov.GetAudit(gpb.GetAuditRequest(verify=True))
            assert [r.event for r in audit.rows] == ["refused_unauthenticated"] and audit.verification.ok
            assert json.loads(audit.rows[0].detail_json)["by"] == {"halt:BadSignature": 1, "halt:UnknownSigner": 1}


async def test_mesh_halt_cli_against_the_router_and_on_the_store(tiny_loaded, tmp_path, gov_dir):
    config = _config(tmp_path, gov_dir)
    app = governance_cmd.typer.Typer()
    governance_cmd.register(app)
    runner = CliRunner()

    async def mesh_cli(*args: str) -> str:
        result = await asyncio.to_thread(runner.invoke, app, list(args), env={"MESH_GOVERNANCE_DIR": str(gov_dir)})
        assert result.exit_code == 0, result.output
        return result.output

    async with local_mesh([tiny_loaded], tmp_path, config, delay_ms=20) as mesh:
        router = mesh.router.address
        started = asyncio.Event()
        stream = asyncio.create_task(_stream(mesh.stub, started, k=1, max_tokens=200))
        await asyncio.wait_for(started.wait(), 20)
        assert "HALTED" in await mesh_cli("halt", "--reason", "from the cli", "--key", "alice", "--router", router)
        _, done, _ = await asyncio.wait_for(stream, 5)
        assert done.finish_reason == "halted"
        assert "resume votes 1/2" in await mesh_cli("resume", "--key", "alice", "--router", router)
        assert "running" in await mesh_cli("resume", "--key", "bob", "--router", router)
        assert not mesh.router.governance.switch.is_halted

        # another process halting on the store directly: the router's watch picks it up
        started = asyncio.Event()
        stream = asyncio.create_task(_stream(mesh.stub, started, k=1, max_tokens=200))
        await asyncio.wait_for(started.wait(), 20)
        await mesh_cli("halt", "--reason", "on the store", "--key", "bob", "--db", config.db_url)
        _, done, _ = await asyncio.wait_for(stream, 5)
        assert done.finish_reason == "halted" and mesh.router.governance.switch.reason == "on the store"


async def _approve(gov, kind: str, target: str, params: dict) -> gpb.ProposalRecord:
    proposal = await gov.SubmitProposal(gpb.SubmitProposalRequest(signed=_signed(
        "carol", {"action": "propose", "kind": kind, "target": target, "params": params, "rationale": "test"})))
    await gov.CastVote(_signed("alice", {"action": "vote", "proposal_id": proposal.id, "choice": "approve"}))
    return await gov.CastVote(_signed("bob", {"action": "vote", "proposal_id": proposal.id, "choice": "approve"}))


async def test_actions_change_router_settings_and_a_halt_reverts_the_last_three(tiny_loaded, tmp_path):
    gov_dir = _gov_dir(tmp_path, phase=2)
    async with local_mesh([tiny_loaded] * 3, tmp_path, _config(tmp_path, gov_dir)) as mesh:
        settings, registry = mesh.router.service.settings, mesh.router.registry
        victim = mesh.experts[0].link.expert_id
        async with channel(mesh.router.address) as ch:
            gov = gpb_grpc.GovernanceStub(ch)
            assert (await _approve(gov, "set_step_deadline", "router", {"seconds": 2.5})).status == "applied"
            weight = await _approve(gov, "set_expert_weight", victim, {"weight": 0.5})
            assert weight.status == "open"  # sandbox_test tier: waits for its sandbox validation
            assert mesh.router.governance.record_sandbox(weight.id, passed=True).status == "applied"
            assert (await _approve(gov, "set_default_k", "router", {"k": 3})).status == "applied"
            tokens, _ = await mesh.generate(prompt=PROMPT, max_tokens=3)  # no k in the request: the new default
            assert all(len(t.expert_ids) == 3 for t in tokens)
            assert (await _approve(gov, "set_selection_policy", "router", {"policy": "capacity"})).status == "applied"
            assert (await _approve(gov, "quarantine_expert", victim, {"quarantined": True})).status == "applied"
            failed = await _approve(gov, "set_selection_policy", "router", {"policy": "learned"})
            assert failed.status == "failed"  # no learned gate registered: the handler refuses, nothing changes

            assert (settings.step_deadline_s, settings.default_k, settings.default_policy) == (2.5, 3, "capacity")
            status = await mesh.stub.GetRouterStatus(router_pb2.RouterStatusRequest())
            assert status.default_k == 3 and status.default_policy == "capacity" and status.phase == 2
            assert registry.get(victim).state == "quarantined" and registry.get(victim).weight == 0.5
            tokens, _ = await mesh.generate(prompt=PROMPT, max_tokens=3, k=2)
            assert all(victim not in t.expert_ids for t in tokens)

            await gov.HaltMesh(_halt("carol"))
            assert settings.default_k == 2 and settings.default_policy == "random"
            assert registry.get(victim).state == "online"
            assert settings.step_deadline_s == 2.5 and registry.get(victim).weight == 0.5  # older ones stay
            rows = (await gov.GetAudit(gpb.GetAuditRequest())).rows
            reverted = [json.loads(r.detail_json)["kind"] for r in rows if r.event == "action_reverted"]
            assert reverted == ["quarantine_expert", "set_selection_policy", "set_default_k"]


async def test_a_generation_that_ignores_the_halt_is_cancelled_after_the_grace(tiny_loaded, tmp_path, gov_dir,
                                                                                 monkeypatch):
    from mesh_llm.router.generation import Generation

    stuck = asyncio.Event()

    async def wait_forever(self, state, checker):  # a wait that does not watch the halt (fault injection)
        stuck.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr(Generation, "_round", wait_forever)
    async with local_mesh([tiny_loaded], tmp_path, _config(tmp_path, gov_dir, halt_grace_s=0.2)) as mesh:
        stream = asyncio.create_task(_stream(mesh.stub, k=1, max_tokens=8))
        await asyncio.wait_for(stuck.wait(), 20)
        async with channel(mesh.router.address) as ch:
            sent = time.perf_counter()
            await gpb_grpc.GovernanceStub(ch).HaltMesh(_halt("bob"))
        tokens, done, end = await asyncio.wait_for(stream, 5)
        assert tokens == 0 and done.finish_reason == "halted" and "cancelled" in done.notes[0]
        assert 0.2 <= end - sent < 2.0
        assert not mesh.router.service.active


def test_a_halt_off_the_event_loop_is_not_undone_by_the_watch_refreshing(tmp_path):
    import threading

    from mesh_llm.governance.policy import load_policy
    from mesh_llm.testing.governance import make_signers, open_governance

    signers = make_signers(list(MEMBERS))
    gov = open_governance(tmp_path / "gov.db", load_policy(REPO_GOV / "policy.toml"), signers)
    flips: list[bool] = []
    gov.switch.add_listener(lambda halted, _reason: flips.append(halted))
    stop = threading.Event()

    def watch() -> None:  # what Governance.watch does, as fast as it can, from another thread
        while not stop.is_set():
            gov.refresh()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        lost = 0
        for i in range(30):
            gov.halt(signers.halt("alice", f"round {i}"))
            lost += not gov.switch.is_halted
            gov.resume(signers.resume("bob"))
            gov.resume(signers.resume("carol"))
    finally:
        stop.set()
        watcher.join(5)
    assert lost == 0 and flips == [True, False] * 30
