"""Every gRPC call on the router and on an expert needs its credential; refusals say which and are counted."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from mesh_llm.auth import Credentials, expert_token
from mesh_llm.errors import MeshError
from mesh_llm.expert.server import advertised_address
from mesh_llm.grpc_util import channel
from mesh_llm.node import RouterConfig
from mesh_llm.pb import agent_pb2, agent_pb2_grpc, expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from mesh_llm.pb import governance_pb2 as gpb
from mesh_llm.pb import governance_pb2_grpc as gpb_grpc
from mesh_llm.router.metrics import router_metrics
from tests.mesh_helpers import local_mesh

API_KEY = "client-key-123456"
NOBODY = Credentials()


def _config(tmp_path, **kw) -> RouterConfig:
    return RouterConfig(port=0, db_url=f"sqlite:///{tmp_path / 'router.db'}", secret="s3cret", api_keys=(API_KEY,),
                        **kw)


async def _code(call) -> tuple[grpc.StatusCode | None, str]:
    try:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return None, ""


def _client_calls(ch):
    router, gov, agent = (router_pb2_grpc.RouterStub(ch), gpb_grpc.GovernanceStub(ch), agent_pb2_grpc.AgentStub(ch))
    return {
        "Generate": lambda: router.Generate(router_pb2.GenerateRequest(prompt="hi", max_tokens=2), timeout=30),
        "ListExperts": lambda: router.ListExperts(router_pb2.ListExpertsRequest(), timeout=5),
        "GetRouterStatus": lambda: router.GetRouterStatus(router_pb2.RouterStatusRequest(), timeout=5),
        "GetAudit": lambda: gov.GetAudit(gpb.GetAuditRequest(limit=5), timeout=5),
        "ListProposals": lambda: gov.ListProposals(gpb.ListProposalsRequest(), timeout=5),
        "SubmitSelfTask": lambda: agent.SubmitSelfTask(agent_pb2.SubmitSelfTaskRequest(
            task_type="config_tuning", context="x"), timeout=5),
        "ListTasks": lambda: agent.ListTasks(agent_pb2.ListTasksRequest(), timeout=5),
    }


async def test_client_calls_without_an_api_key_are_refused_and_counted(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded], tmp_path, _config(tmp_path)) as mesh:
        async with channel(mesh.router.address, credentials=NOBODY) as ch:
            for name, call in _client_calls(ch).items():
                code, details = await _code(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED, name
                assert "MESH_API_KEY" in details and "api_keys" in details
        async with channel(mesh.router.address, credentials=Credentials(bearer="wrong-key-000")) as ch:
            code, _ = await _code(_client_calls(ch)["GetRouterStatus"])
            assert code == grpc.StatusCode.UNAUTHENTICATED
        async with channel(mesh.router.address, credentials=Credentials(bearer=API_KEY)) as ch:
            for name, call in _client_calls(ch).items():
                code, details = await _code(call)
                assert code is None, (name, details)
        exposition = router_metrics(mesh.router.registry).exposition().decode()
        assert 'mesh_router_unauthenticated_calls_total{method="Generate"} 1.0' in exposition
        assert 'mesh_router_unauthenticated_calls_total{method="GetRouterStatus"} 2.0' in exposition


async def test_local_clients_use_the_operator_key_and_health_stays_open(tiny_loaded, tmp_path, mesh_home):
    async with local_mesh([tiny_loaded], tmp_path, _config(tmp_path)) as mesh:
        assert (mesh_home / "operator_key").stat().st_mode & 0o077 == 0
        async with channel(mesh.router.address) as ch:  # this machine's credentials: the operator key
            status = await router_pb2_grpc.RouterStub(ch).GetRouterStatus(router_pb2.RouterStatusRequest(), timeout=5)
        assert len(status.experts) == 1
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with channel(mesh.router.address, credentials=NOBODY) as ch:
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_governance_submissions_need_a_signature_not_an_api_key(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded], tmp_path, _config(tmp_path)) as mesh:
        async with channel(mesh.router.address, credentials=NOBODY) as ch:
            code, details = await _code(lambda: gpb_grpc.GovernanceStub(ch).SubmitProposal(
                gpb.SubmitProposalRequest(), timeout=5))
    assert code is not None and "must be signed by a key listed in members.toml" in details  # not "API key"


async def test_heartbeats_carry_the_issued_expert_token_never_the_mesh_secret(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded], tmp_path, _config(tmp_path)) as mesh:
        link = mesh.experts[0].link
        assert link.token == expert_token("s3cret", link.expert_id) and "s3cret" not in link.token
        beat = router_pb2.HeartbeatRequest(expert_id=link.expert_id)
        async with channel(mesh.router.address, credentials=NOBODY) as ch:
            stub = router_pb2_grpc.RouterStub(ch)
            code, details = await _code(lambda: stub.Heartbeat(beat, timeout=5))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "expert token" in details
            code, _ = await _code(lambda: stub.Heartbeat(beat, timeout=5, metadata=(("authorization", "Bearer s3cret"),)))
            assert code == grpc.StatusCode.UNAUTHENTICATED  # the mesh secret only registers
            other = expert_token("s3cret", "e-someoneelse")
            code, _ = await _code(lambda: stub.Heartbeat(beat, timeout=5, metadata=(("authorization", f"Bearer {other}"),)))
            assert code == grpc.StatusCode.PERMISSION_DENIED  # a token of another expert
            reply = await stub.Heartbeat(beat, timeout=5, metadata=(("authorization", f"Bearer {link.token}"),))
            assert reply.known
            code, details = await _code(lambda: stub.RegisterExpert(router_pb2.RegisterExpertRequest(
                address="127.0.0.1:1", mesh_secret="s3cret"), timeout=5))
            assert code == grpc.StatusCode.UNAUTHENTICATED and "invite token" in details  # the field is not read


async def test_only_callers_holding_the_expert_key_may_step_it(tiny_loaded, tmp_path):
    async with local_mesh([tiny_loaded], tmp_path, _config(tmp_path), key="expert-key-abcdef") as mesh:
        expert = mesh.experts[0]
        step = expert_pb2.StepRequest(session_id="s", tokens=[1, 2, 3], top_k=4)
        async with channel(expert.address, credentials=NOBODY) as ch:
            stub = expert_pb2_grpc.ExpertStub(ch)
            for call in (lambda: stub.Step(step, timeout=5), lambda: stub.Info(expert_pb2.InfoRequest(), timeout=5),
                         lambda: stub.GetTokenizer(expert_pb2.TokenizerRequest(), timeout=5)):
                code, details = await _code(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED and "x-mesh-expert-key" in details
        async with channel(expert.address, credentials=Credentials(expert_key="expert-key-abcdef")) as ch:
            reply = await expert_pb2_grpc.ExpertStub(ch).Step(step, timeout=10)
        assert len(reply.distributions) == 1
        tokens, done = await mesh.generate(prompt="hi", max_tokens=3, k=1)  # the router holds the key
        assert done.finish_reason in ("length", "eos", "stop") and tokens
        await asyncio.sleep(0)


def test_a_loopback_expert_refuses_to_advertise_itself_to_a_remote_router():
    with pytest.raises(MeshError, match="--host 0.0.0.0 .* --advertise HOST:PORT"):
        advertised_address("127.0.0.1", "203.0.113.7:50050", 50061)
    assert advertised_address("127.0.0.1", "127.0.0.1:50050", 50061) == "127.0.0.1:50061"
    assert advertised_address("10.1.2.3", "203.0.113.7:50050", 50061) == "10.1.2.3:50061"
