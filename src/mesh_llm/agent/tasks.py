"""Task types, the persisted task record and its state changes, each written to the audit log."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import Engine, insert, select, update

from mesh_llm.errors import MeshError
from mesh_llm.governance import audit
from mesh_llm.governance.tx import write_tx
from mesh_llm.store.agent_tables import agent_tasks

log = logging.getLogger(__name__)

ACTOR = "agent"  # audit actor of every agent step
MAX_CONTEXT_BYTES = 64 * 1024  # largest context a submitter may attach (UTF-8 bytes)


@dataclass(frozen=True, kw_only=True)
class TaskType:
    name: str  # task type name users pass to `mesh agent submit`
    goal: str  # what the mesh is asked to do, put into the prompt
    kinds: tuple[str, ...]  # governance action kinds a task of this type may propose


TASK_TYPES: dict[str, TaskType] = {
    t.name: t
    for t in (
        TaskType(name="scheduler_optimization",
                 goal="Improve how the router schedules experts: experts per token (K), selection policy, "
                      "per-token deadline, or taking a failing expert out of selection.",
                 kinds=("set_default_k", "set_selection_policy", "set_step_deadline", "quarantine_expert", "note")),
        TaskType(name="security_log_analysis",
                 goal="Read the recent refusals and audit events for signs of abuse or faults; report what you "
                      "see, or take a misbehaving expert out of selection.",
                 kinds=("observe", "note", "quarantine_expert")),
        TaskType(name="test_generation",
                 goal="Suggest one test the mesh should have, based on the state and recent events.",
                 kinds=("note", "observe")),
        TaskType(name="config_tuning",
                 goal="Tune the mesh configuration: an expert's mixing weight, experts per token (K) or the "
                      "per-token deadline.",
                 kinds=("set_expert_weight", "set_default_k", "set_step_deadline", "note")),
        TaskType(name="governance_proposal_draft",
                 goal="Draft a proposal for the governance members: a suggestion in words, or a phase change.",
                 kinds=("note", "set_phase")),
    )
}
ROTATION = tuple(TASK_TYPES)  # order in which the runner creates tasks

QUEUED, RUNNING = "queued", "running"
AWAITING_REVIEW, AWAITING_VOTES = "awaiting_review", "awaiting_votes"
SANDBOX_PASSED, SANDBOX_FAILED = "sandbox_passed", "sandbox_failed"
APPLIED, REVERTED, REPORTED = "applied", "reverted", "reported"
REJECTED, REFUSED, INTERRUPTED, FAILED, DONE = "rejected", "refused", "interrupted", "failed", "done"
WAITING = frozenset({AWAITING_REVIEW, AWAITING_VOTES, SANDBOX_PASSED})  # followed up by the runner
FINAL = frozenset({SANDBOX_FAILED, APPLIED, REVERTED, REPORTED, REJECTED, REFUSED, FAILED, DONE})
STATES = frozenset({QUEUED, RUNNING, INTERRUPTED}) | WAITING | FINAL


class TaskRefused(MeshError):
    """A task or a proposal the agent will not take, with the reason."""


class UnknownTask(MeshError):
    """No agent task has this id."""


class SubmitTask(BaseModel):
    """A self-task as a person (CLI) or a peer (gRPC SubmitSelfTask) sends it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(min_length=1, max_length=64)  # one of TASK_TYPES
    context: str = ""  # free text attached to the prompt, at most MAX_CONTEXT_BYTES
    kinds: tuple[str, ...] = ()  # narrow the type's action kinds (empty = all of them)

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in TASK_TYPES:
            raise ValueError(f"unknown task type {value!r}; known: {', '.join(TASK_TYPES)}")
        return value

    @field_validator("context")
    @classmethod
    def _bounded(cls, value: str) -> str:
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_CONTEXT_BYTES:
            raise ValueError(f"context is {size} bytes; the limit is {MAX_CONTEXT_BYTES} bytes (64 KiB)")
        if "\x00" in value:
            raise ValueError("context contains NUL characters; attach text")
        return value

    def checked_kinds(self) -> tuple[str, ...]:
        """The kinds asked for, each one the type allows; TaskRefused otherwise."""
        allowed = TASK_TYPES[self.type].kinds
        wrong = [k for k in self.kinds if k not in allowed]
        if wrong:
            raise TaskRefused(f"task type {self.type} may not propose {', '.join(wrong)}; "
                              f"it may propose {', '.join(allowed)}")
        return tuple(dict.fromkeys(self.kinds)) or allowed


@dataclass(frozen=True, kw_only=True)
class TaskRecord:
    id: int  # task id
    type: str  # task type
    kinds: tuple[str, ...]  # action kinds it may propose
    source: str  # who queued it
    subset: int | None  # subset that ran it
    expert_ids: tuple[str, ...]  # experts its generation was limited to
    state: str  # see STATES
    context: str  # submitter's text
    prompt: str  # prompt sent to the mesh
    raw_output: str  # what the mesh generated
    proposal: dict | None  # parsed proposal
    tier: str  # governance tier ('' before submission)
    proposal_id: int | None  # governance proposal id
    baseline: dict  # metric at proposal time
    outcome: str  # result for people
    error: str  # why it failed, was refused or interrupted
    attempts: int  # times started
    created_at: float  # unix seconds
    updated_at: float  # unix seconds
    started_at: float | None  # unix seconds of the last start
    finished_at: float | None  # unix seconds it reached a final state

    @classmethod
    def from_row(cls, row) -> TaskRecord:
        """Record of one agent_tasks row."""
        data = dict(row._mapping)
        data["kinds"] = tuple(json.loads(data["kinds"]))
        data["expert_ids"] = tuple(json.loads(data["expert_ids"]))
        data["proposal"] = json.loads(data["proposal"]) if data["proposal"] else None
        data["baseline"] = json.loads(data["baseline"]) if data["baseline"] else {}
        return cls(**data)


_JSON_FIELDS = {"kinds", "expert_ids", "proposal", "baseline"}


def _dump(name: str, value):
    if name in _JSON_FIELDS:
        return "" if value is None else json.dumps(list(value) if isinstance(value, tuple) else value,
                                                   sort_keys=True, default=str)
    return value


class TaskStore:
    """Agent tasks in the SQL store; every change is one transaction with its audit row."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time) -> None:
        """Keep tasks in this (migrated) engine's database."""
        self.engine = engine
        self.clock = clock

    def audit(self, event: str, detail: dict) -> None:
        """Append one agent audit row."""
        with write_tx(self.engine) as conn:
            audit.append(conn, ts=self.clock(), event=event, actor=ACTOR, detail=detail)

    def refuse(self, message: str, detail: dict) -> TaskRefused:
        """Audit a refusal and return the error to raise."""
        log.warning("agent refused: %s", message)
        self.audit("agent_refused", {**detail, "reason": message})
        return TaskRefused(message)

    def submit(self, request: SubmitTask | dict, *, source: str) -> TaskRecord:
        """Validate and queue a task; TaskRefused (audited) on bad input."""
        raw = request if isinstance(request, dict) else request.model_dump()
        try:
            task = request if isinstance(request, SubmitTask) else SubmitTask.model_validate(request)
            kinds = task.checked_kinds()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            message = f"{where}: {first['msg'].removeprefix('Value error, ')}"
            raise self.refuse(message, _refusal_detail(raw, source)) from None
        except TaskRefused as exc:
            raise self.refuse(str(exc), _refusal_detail(raw, source)) from None
        return self.create(task.type, kinds=kinds, context=task.context, source=source)

    def create(self, type_name: str, *, kinds: tuple[str, ...], context: str = "", source: str,
               subset: int | None = None) -> TaskRecord:
        """Queue a task of a known type (audited agent_task_queued)."""
        now = self.clock()
        with write_tx(self.engine) as conn:
            task_id = conn.execute(insert(agent_tasks).values(
                type=type_name, kinds=_dump("kinds", kinds), source=source[:128], subset=subset, expert_ids="[]",
                state=QUEUED, context=context, prompt="", raw_output="", proposal="", tier="", proposal_id=None,
                baseline="", outcome="", error="", attempts=0, created_at=now, updated_at=now)).inserted_primary_key[0]
            audit.append(conn, ts=now, event="agent_task_queued", actor=ACTOR,
                         detail={"task_id": task_id, "type": type_name, "kinds": list(kinds), "source": source,
                                 "context_bytes": len(context.encode())})
        return self.get(task_id)

    def get(self, task_id: int) -> TaskRecord:
        """One task; UnknownTask if there is none."""
        with self.engine.connect() as conn:
            row = conn.execute(select(agent_tasks).where(agent_tasks.c.id == task_id)).first()
        if row is None:
            raise UnknownTask(f"no agent task {task_id}; see `mesh agent tasks`")
        return TaskRecord.from_row(row)

    def list(self, *, states: set[str] | frozenset[str] | None = None, limit: int | None = None,
             oldest_first: bool = False) -> list[TaskRecord]:
        """Tasks, newest first (or oldest first), optionally only in these states."""
        order = agent_tasks.c.id.asc() if oldest_first else agent_tasks.c.id.desc()
        query = select(agent_tasks).order_by(order)
        if states:
            query = query.where(agent_tasks.c.state.in_(sorted(states)))
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [TaskRecord.from_row(r) for r in conn.execute(query).all()]

    def claim(self, task_id: int, *, subset: int | None, expert_ids: tuple[str, ...]) -> TaskRecord | None:
        """Move a queued task to running for this subset; None when another runner took it."""
        now = self.clock()
        with write_tx(self.engine) as conn:
            result = conn.execute(update(agent_tasks).where(agent_tasks.c.id == task_id,
                                                            agent_tasks.c.state == QUEUED)
                                  .values(state=RUNNING, subset=subset, expert_ids=_dump("expert_ids", expert_ids),
                                          attempts=agent_tasks.c.attempts + 1, started_at=now, updated_at=now,
                                          error=""))
            if result.rowcount != 1:
                return None
            audit.append(conn, ts=now, event="agent_task_started", actor=ACTOR,
                         detail={"task_id": task_id, "subset": subset, "expert_ids": list(expert_ids)})
        return self.get(task_id)

    def update(self, task_id: int, *, event: str, detail: dict | None = None, from_states: set[str] | None = None,
               **fields) -> TaskRecord | None:
        """Change fields (and state) of a task with an audit row; None when it was not in from_states."""
        now = self.clock()
        values = {name: _dump(name, value) for name, value in fields.items()}
        values["updated_at"] = now
        if fields.get("state") in FINAL:
            values["finished_at"] = now
        query = update(agent_tasks).where(agent_tasks.c.id == task_id)
        if from_states:
            query = query.where(agent_tasks.c.state.in_(sorted(from_states)))
        with write_tx(self.engine) as conn:
            if conn.execute(query.values(**values)).rowcount != 1:
                return None
            shown = {k: v for k, v in fields.items() if k in ("state", "tier", "proposal_id", "error", "outcome")}
            audit.append(conn, ts=now, event=event, actor=ACTOR, detail={"task_id": task_id, **shown, **(detail or {})})
        return self.get(task_id)

    def step(self, task_id: int, event: str, detail: dict | None = None) -> None:
        """Audit one step of a task that changes none of its fields."""
        self.audit(event, {"task_id": task_id, **(detail or {})})

    def recover(self) -> list[int]:
        """Mark tasks left running as interrupted, then requeue every interrupted task; return their ids."""
        requeued = []
        for task in self.list(states={RUNNING}, oldest_first=True):
            self.update(task.id, event="agent_task_interrupted", from_states={RUNNING}, state=INTERRUPTED,
                        error="the agent stopped while this task ran (found running at start)")
        for task in self.list(states={INTERRUPTED}, oldest_first=True):
            if self.update(task.id, event="agent_task_requeued", from_states={INTERRUPTED}, state=QUEUED,
                           detail={"previous_error": task.error}):
                requeued.append(task.id)
        return requeued


def _refusal_detail(raw: dict, source: str) -> dict:
    context = raw.get("context", "")
    return {"op": "submit_task", "source": source, "type": str(raw.get("type", ""))[:64],
            "context_bytes": len(context.encode("utf-8", "surrogatepass")) if isinstance(context, str) else None}
