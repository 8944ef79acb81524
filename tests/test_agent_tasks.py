"""Agent tasks in the store: submission and refusals (audited), restart recovery, the gRPC service and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from mesh_llm.agent import service as agent_service
from mesh_llm.agent.tasks import MAX_CONTEXT_BYTES, QUEUED, RUNNING, TaskRefused, TaskStore
from mesh_llm.cli import agent_cmd
from mesh_llm.governance.audit import rows, verify
from mesh_llm.governance.core import Governance
from mesh_llm.grpc_util import channel, new_server
from mesh_llm.pb import agent_pb2 as pb
from mesh_llm.pb import agent_pb2_grpc as pb_grpc
from mesh_llm.store.db import open_engine
from mesh_llm.testing.agent import governance_folder, signed_halt

REPO_GOV = Path(__file__).resolve().parents[1] / "governance"


@pytest.fixture
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mesh.db'}"


@pytest.fixture
def store(db_url) -> TaskStore:
    return TaskStore(open_engine(db_url))


def _audit(store: TaskStore) -> list:
    with store.engine.connect() as conn:
        return rows(conn)


def test_submit_queues_a_task_and_audits_it(store):
    task = store.submit({"type": "config_tuning", "context": "weights look off"}, source="test")
    assert task.state == QUEUED and task.kinds == ("set_expert_weight", "set_default_k", "set_step_deadline", "note")
    narrow = store.submit({"type": "config_tuning", "kinds": ["set_default_k"]}, source="test")
    assert narrow.kinds == ("set_default_k",)
    events = [(r.event, r.actor, json.loads(r.detail)["task_id"]) for r in _audit(store)]
    assert events == [("agent_task_queued", "agent", task.id), ("agent_task_queued", "agent", narrow.id)]


@pytest.mark.parametrize("request_, words", [
    ({"type": "world_domination"}, "unknown task type 'world_domination'"),
    ({"type": "config_tuning", "context": "x" * (MAX_CONTEXT_BYTES + 1)}, "the limit is 65536 bytes"),
    ({"type": "test_generation", "kinds": ["set_default_k"]}, "may not propose set_default_k"),
    ({"type": "config_tuning", "extra": 1}, "extra"),
])
def test_bad_submissions_are_refused_with_a_reason_and_audited(store, request_, words):
    with pytest.raises(TaskRefused) as err:
        store.submit(request_, source="test")
    assert words in str(err.value)
    [row] = _audit(store)
    assert row.event == "agent_refused" and row.actor == "agent" and words in json.loads(row.detail)["reason"]
    assert store.list() == []


def test_restart_marks_running_tasks_interrupted_and_requeues_them(store):
    a = store.create("config_tuning", kinds=("note",), source="test")
    b = store.create("test_generation", kinds=("note",), source="test")
    assert store.claim(a.id, subset=0, expert_ids=("e-1",)).state == RUNNING
    assert store.claim(a.id, subset=1, expert_ids=("e-2",)) is None  # a claimed task cannot be claimed again
    requeued = store.recover()  # what a restarted runner does first
    assert requeued == [a.id]
    assert store.get(a.id).state == QUEUED and store.get(a.id).attempts == 1 and store.get(b.id).state == QUEUED
    events = [r.event for r in _audit(store)]
    assert events[-2:] == ["agent_task_interrupted", "agent_task_requeued"]
    with store.engine.connect() as conn:
        assert verify(conn).ok


async def test_grpc_service_submits_lists_shows_and_refuses(tmp_path, db_url):
    gov = Governance.open(db_url, gov_dir=governance_folder(tmp_path / "gov", phase=2, source=REPO_GOV))
    server = new_server()
    agent_service.add_to_server(server, gov)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.AgentStub(ch)
            task = await stub.SubmitSelfTask(pb.SubmitSelfTaskRequest(task_type="security_log_analysis",
                                                                      context="many refusals from 10.0.0.7"))
            assert task.state == "queued" and task.subset == -1 and task.source.startswith("grpc:")
            listed = await stub.ListTasks(pb.ListTasksRequest())
            assert [t.id for t in listed.tasks] == [task.id]
            shown = await stub.GetTask(pb.GetTaskRequest(id=task.id))
            assert shown.context == "many refusals from 10.0.0.7"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetTask(pb.GetTaskRequest(id=999))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SubmitSelfTask(pb.SubmitSelfTaskRequest(task_type="nope"))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown task type" in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SubmitSelfTask(pb.SubmitSelfTaskRequest(task_type="config_tuning",
                                                                   context="é" * MAX_CONTEXT_BYTES))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "64 KiB" in err.value.details()
            gov.halt(signed_halt("alice", "stop the agent"))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.SubmitSelfTask(pb.SubmitSelfTaskRequest(task_type="config_tuning"))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "halted" in err.value.details()
    finally:
        await server.stop(0)
    refusals = [json.loads(r.detail)["reason"] for r in gov.audit_rows() if r.event == "agent_refused"]
    assert len(refusals) == 3 and "halted" in refusals[-1]
    assert gov.verify_audit().ok


def test_cli_submit_tasks_show_on_the_local_store(tmp_path, db_url):
    app = __import__("typer").Typer()
    agent_cmd.register(app)
    runner = CliRunner()
    context = tmp_path / "ctx.txt"
    context.write_text("p99 latency doubled since yesterday")
    result = runner.invoke(app, ["agent", "submit", "scheduler_optimization", "--context", str(context),
                                 "--kind", "set_default_k", "--db", db_url])
    assert result.exit_code == 0, result.output
    assert "queued task #1" in result.output
    big = tmp_path / "big.txt"
    big.write_text("y" * (MAX_CONTEXT_BYTES + 10))
    result = runner.invoke(app, ["agent", "submit", "config_tuning", "--context", str(big), "--db", db_url])
    assert result.exit_code == 1 and "64 KiB" in result.output
    result = runner.invoke(app, ["agent", "submit", "bogus", "--db", db_url])
    assert result.exit_code == 1 and "unknown task type" in result.output
    result = runner.invoke(app, ["agent", "tasks", "--db", db_url])
    assert result.exit_code == 0 and "#1" in result.output and "queued" in result.output
    result = runner.invoke(app, ["agent", "show", "1", "--db", db_url])
    assert result.exit_code == 0 and "p99 latency doubled" in result.output and "agent_task_queued" in result.output
    result = runner.invoke(app, ["agent", "show", "7", "--db", db_url])
    assert result.exit_code == 1 and "no agent task 7" in result.output
    assert agent_cmd.parse_interval("10m") == 600 and agent_cmd.parse_interval("45") == 45
    with pytest.raises(ValueError):
        agent_cmd.parse_interval("soon")
    assert agent_cmd.parse_interval("0m", "--resume-wait", allow_zero=True) == 0  # --resume-wait 0: no waiting
    with pytest.raises(ValueError, match="--deadline must be > 0"):
        agent_cmd.parse_interval("0", "--deadline")


def test_migrated_agent_table_matches_the_table_definition(store):
    from sqlalchemy import inspect

    from mesh_llm.store.agent_tables import agent_tasks
    from mesh_llm.store.migrate import current_version

    assert current_version(store.engine) >= 3
    columns = {c["name"]: c for c in inspect(store.engine).get_columns("agent_tasks")}
    assert set(columns) == set(agent_tasks.c.keys())
    for column in agent_tasks.c:
        assert type(columns[column.name]["type"]).__name__.upper() == \
            column.type.compile(store.engine.dialect).split("(")[0]
        assert columns[column.name]["nullable"] == column.nullable
