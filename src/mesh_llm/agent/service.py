"""gRPC Agent service (grpc.aio): SubmitSelfTask, ListTasks, GetTask over the task store."""

from __future__ import annotations

import json
import logging

import grpc
from sqlalchemy import Engine

from mesh_llm.agent.tasks import STATES, TaskRecord, TaskRefused, TaskStore, UnknownTask
from mesh_llm.governance.killswitch import HaltSwitch
from mesh_llm.pb import agent_pb2 as pb
from mesh_llm.pb import agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Agent"].full_name


def task_to_pb(task: TaskRecord) -> pb.AgentTask:
    """The AgentTask message of a task record."""
    return pb.AgentTask(
        id=task.id, type=task.type, kinds=list(task.kinds), source=task.source,
        subset=-1 if task.subset is None else task.subset, expert_ids=list(task.expert_ids), state=task.state,
        context=task.context, prompt=task.prompt, raw_output=task.raw_output,
        proposal_json=json.dumps(task.proposal, sort_keys=True) if task.proposal else "", tier=task.tier,
        proposal_id=task.proposal_id or 0, baseline_json=json.dumps(task.baseline, sort_keys=True) if task.baseline
        else "", outcome=task.outcome, error=task.error, attempts=task.attempts, created_at=task.created_at,
        updated_at=task.updated_at, started_at=task.started_at or 0.0, finished_at=task.finished_at or 0.0)


class AgentServicer(pb_grpc.AgentServicer):
    """Answers Agent RPCs from the task store; refusals carry their reason and are audited."""

    def __init__(self, store: TaskStore, switch: HaltSwitch | None = None) -> None:
        """Serve this store; while switch is halted, new tasks are refused."""
        self.store = store
        self.switch = switch

    async def SubmitSelfTask(self, request, context):  # noqa: N802
        """Queue a self-task."""
        source = request.source or f"grpc:{context.peer()}"
        if self.switch is not None and self.switch.is_halted:
            message = (f"the mesh is halted ({self.switch.reason}); no agent task is taken until a quorum of "
                       "`mesh resume` votes lifts it")
            self.store.refuse(message, {"op": "submit_task", "source": source, "type": request.task_type[:64]})
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, message)
        try:
            task = self.store.submit({"type": request.task_type, "context": request.context,
                                      "kinds": tuple(request.kinds)}, source=source)
        except TaskRefused as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return task_to_pb(task)

    async def ListTasks(self, request, context):  # noqa: N802
        """Tasks, newest first."""
        if request.state and request.state not in STATES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"unknown state {request.state!r}; known: {', '.join(sorted(STATES))}")
        tasks = self.store.list(states={request.state} if request.state else None, limit=request.limit or 50)
        return pb.ListTasksReply(tasks=[task_to_pb(t) for t in tasks])

    async def GetTask(self, request, context):  # noqa: N802
        """One task."""
        try:
            return task_to_pb(self.store.get(request.id))
        except UnknownTask as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))


def add_to_server(server: grpc.aio.Server, governance=None, *, engine: Engine | None = None) -> AgentServicer:
    """Register the Agent service on a server, over governance's store (and its halt switch) or an engine."""
    if governance is None and engine is None:
        raise ValueError("add_to_server needs the router's Governance (or an engine)")
    store = TaskStore(engine if engine is not None else governance.engine)
    servicer = AgentServicer(store, governance.switch if governance is not None else None)
    pb_grpc.add_AgentServicer_to_server(servicer, server)
    return servicer
