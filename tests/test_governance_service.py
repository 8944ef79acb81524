"""The gRPC Governance service on a grpc.aio server bound to port 0."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh_llm.governance import convert, keys, ops
from mesh_llm.governance.core import Governance
from mesh_llm.governance.errors import GovernanceError
from mesh_llm.governance.policy import add_member
from mesh_llm.governance.service import SERVICE_NAME, start_server
from mesh_llm.governance.signing import sign
from mesh_llm.pb import governance_pb2 as pb
from mesh_llm.pb import governance_pb2_grpc as pb_grpc

REPO_GOV = Path(__file__).resolve().parents[1] / "governance"


@pytest.fixture
async def served(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    gov_dir = tmp_path / "governance"
    gov_dir.mkdir()
    shutil.copy(REPO_GOV / "policy.toml", gov_dir / "policy.toml")
    monkeypatch.setenv("MESH_GOVERNANCE_DIR", str(gov_dir))
    for name in ("alice", "bob"):
        add_member(gov_dir / "members.toml", name, keys.new_key(name))
    gov = Governance.open(f"sqlite:///{tmp_path / 'mesh.db'}")
    server, port = await start_server(gov)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield gov, pb_grpc.GovernanceStub(channel), channel, port
    await channel.close()
    await server.stop(None)


async def test_halt_mesh_with_valid_and_forged_signatures(served):
    gov, stub, channel, _ = served
    forged = sign(keys.load_key("bob"), "alice", {"action": "halt", "reason": "forged"})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.HaltMesh(convert.signed_to_pb(forged))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "BadSignature" in refused.value.details()
    assert not gov.switch.is_halted

    valid = sign(keys.load_key("alice"), "alice", {"action": "halt", "reason": "runaway task"})
    state = await stub.HaltMesh(convert.signed_to_pb(valid))
    assert state.halted and state.reason == "runaway task" and state.resume_required == 2
    assert gov.switch.is_halted

    with pytest.raises(grpc.aio.AioRpcError) as replay:
        await stub.HaltMesh(convert.signed_to_pb(valid))
    assert replay.value.code() == grpc.StatusCode.UNAUTHENTICATED and "ReplayedNonce" in replay.value.details()

    reply = await stub.GetAudit(pb.GetAuditRequest(verify=True))
    assert [r.event for r in reply.rows] == ["halt"]  # unauthenticated refusals are counted, not written one by one
    assert gov.flush_refusals(force=True) == 2
    reply = await stub.GetAudit(pb.GetAuditRequest(verify=True))
    assert [r.event for r in reply.rows] == ["halt", "refused_unauthenticated"]
    assert json.loads(reply.rows[-1].detail_json)["by"] == {"halt:BadSignature": 1, "halt:ReplayedNonce": 1}
    assert reply.verification.ok and reply.verification.checked == 2

    health = health_pb2_grpc.HealthStub(channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


async def test_cli_operations_over_grpc(served):
    gov, stub, _, port = served
    router = f"127.0.0.1:{port}"
    state = await asyncio.to_thread(ops.halt_mesh, key="bob", reason="via router", router=router)
    assert state.halted and gov.switch.reason == "via router"
    with pytest.raises(GovernanceError, match="MeshHalted"):
        await asyncio.to_thread(ops.phase_propose, 2, key="bob", router=router)
    await asyncio.to_thread(ops.resume_mesh, key="alice", router=router)
    state = await asyncio.to_thread(ops.resume_mesh, key="bob", router=router)
    assert not state.halted and not gov.switch.is_halted
    proposal = await asyncio.to_thread(ops.phase_propose, 2, key="bob", router=router)
    assert proposal.tier == "deploy_major"
    voted = await asyncio.to_thread(ops.cast_vote, proposal_id=proposal.id, choice="approve", key="alice",
                                    router=router)
    assert voted.votes == (("alice", "approve"),)
    with pytest.raises(GovernanceError, match="DoubleVote"):
        await asyncio.to_thread(ops.cast_vote, proposal_id=proposal.id, choice="reject", key="alice", router=router)
    with pytest.raises(GovernanceError, match="UnknownProposal"):
        await asyncio.to_thread(ops.show_proposal, 42, router=router)
    listed = await asyncio.to_thread(ops.list_proposals, router=router)
    assert [p.id for p in listed] == [proposal.id]
    assert (await asyncio.to_thread(ops.phase_show, router=router)).phase == 1
    assert (await asyncio.to_thread(ops.audit_verify, router=router)).ok
    rows = await asyncio.to_thread(ops.audit_show, limit=2, router=router)
    assert len(rows) == 2 and rows[-1].event == "refused"
    assert dataclasses.asdict(await asyncio.to_thread(ops.halt_state, router=router))["halted"] is False


async def test_unreachable_router_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_HOME", str(tmp_path / "home"))
    keys.new_key("alice")
    monkeypatch.setattr(ops, "RPC_TIMEOUT_S", 1.0)
    with pytest.raises(GovernanceError, match="cannot reach"):
        await asyncio.to_thread(ops.halt_mesh, key="alice", reason="x", router="127.0.0.1:1")
