"""What the `mesh agent` commands do: on the local store, or through a router's Agent service."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import grpc

from mesh_llm.agent.progress import Progress
from mesh_llm.agent.runner import Runner, RunnerConfig, RunReport
from mesh_llm.agent.tasks import MAX_CONTEXT_BYTES, TaskRecord, TaskStore
from mesh_llm.errors import MeshError
from mesh_llm.grpc_util import channel
from mesh_llm.pb import agent_pb2 as pb
from mesh_llm.pb import agent_pb2_grpc as pb_grpc
from mesh_llm.store.db import open_engine

log = logging.getLogger(__name__)

READ_LIMIT = 1 << 20  # a context file larger than this is refused before it is read or sent


def task_from_pb(msg: pb.AgentTask) -> TaskRecord:
    """The TaskRecord of an AgentTask message."""
    return TaskRecord(id=msg.id, type=msg.type, kinds=tuple(msg.kinds), source=msg.source,
                      subset=None if msg.subset < 0 else msg.subset, expert_ids=tuple(msg.expert_ids), state=msg.state,
                      context=msg.context, prompt=msg.prompt, raw_output=msg.raw_output,
                      proposal=json.loads(msg.proposal_json) if msg.proposal_json else None, tier=msg.tier,
                      proposal_id=msg.proposal_id or None,
                      baseline=json.loads(msg.baseline_json) if msg.baseline_json else {}, outcome=msg.outcome,
                      error=msg.error, attempts=msg.attempts, created_at=msg.created_at, updated_at=msg.updated_at,
                      started_at=msg.started_at or None, finished_at=msg.finished_at or None)


def _store(db: str | None) -> TaskStore:
    return TaskStore(open_engine(db))


async def _rpc(router: str, method: str, request):
    async with channel(router) as ch:
        try:
            return await getattr(pb_grpc.AgentStub(ch), method)(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise MeshError(f"the router at {router} does not serve the Agent service; use the local store "
                                "(leave out --router)") from None
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise MeshError(f"no router answers at {router} ({exc.details()})") from None
            raise MeshError(f"router refused: {exc.details()} ({exc.code().name})") from None


def read_context(path: Path | None, *, db: str | None = None) -> str:
    """The text of a context file; refused (audited on the local store) when missing, too large or not UTF-8."""
    if path is None:
        return ""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MeshError(f"cannot read context file {path}: {exc.strerror}") from None
    if size > READ_LIMIT:
        message = f"context file {path} is {size} bytes; the limit is {MAX_CONTEXT_BYTES} bytes (64 KiB)"
        raise _store(db).refuse(message, {"op": "submit_task", "source": "cli", "context_bytes": size})
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _store(db).refuse(f"context file {path} is not UTF-8 text",
                                {"op": "submit_task", "source": "cli", "context_bytes": size}) from None


def submit_task(task_type: str, *, context: str = "", kinds: tuple[str, ...] = (), router: str | None = None,
                db: str | None = None) -> TaskRecord:
    """Queue a self-task on the router (SubmitSelfTask) or on the local store."""
    if router:
        msg = asyncio.run(_rpc(router, "SubmitSelfTask", pb.SubmitSelfTaskRequest(
            task_type=task_type, context=context, kinds=list(kinds), source="cli")))
        return task_from_pb(msg)
    return _store(db).submit({"type": task_type, "context": context, "kinds": tuple(kinds)}, source="cli")


def list_tasks(*, state: str | None = None, limit: int = 50, router: str | None = None,
               db: str | None = None) -> list[TaskRecord]:
    """Tasks, newest first."""
    if router:
        reply = asyncio.run(_rpc(router, "ListTasks", pb.ListTasksRequest(state=state or "", limit=limit)))
        return [task_from_pb(t) for t in reply.tasks]
    return _store(db).list(states={state} if state else None, limit=limit)


def show_task(task_id: int, *, router: str | None = None, db: str | None = None) -> TaskRecord:
    """One task."""
    if router:
        return task_from_pb(asyncio.run(_rpc(router, "GetTask", pb.GetTaskRequest(id=task_id))))
    return _store(db).get(task_id)


def task_audit(task_id: int, *, db: str | None = None) -> list:
    """The audit rows about one task (local store), oldest first."""
    from mesh_llm.governance.audit import rows

    engine = open_engine(db)
    with engine.connect() as conn:
        found = []
        for row in rows(conn):
            if row.actor == "agent" and json.loads(row.detail).get("task_id") == task_id:
                found.append(row)
            elif row.actor == f"agent:task-{task_id}":
                found.append(row)
        return found


async def run_agent(config: RunnerConfig, *, db: str | None = None, gov_dir: Path | None = None,
                    progress: Progress | None = None) -> RunReport:
    """Run the agent loop against config.agent.router on the store at db until stopped or halted."""
    from mesh_llm.governance.core import Governance

    gov = Governance.open(db, gov_dir=gov_dir)
    runner = Runner(config, gov=gov, store=TaskStore(gov.engine), progress=progress)
    return await runner.run()

