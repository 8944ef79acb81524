"""`mesh agent submit|run|tasks|show`: the self-prompting agent."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import re
import sys
from pathlib import Path

import typer

from mesh_llm.cli.errors import friendly_errors

log = logging.getLogger(__name__)

agent_app = typer.Typer(help="The self-prompting agent: tasks that propose changes to the mesh through governance.",
                        no_args_is_help=True)
DB = typer.Option(None, "--db", help="SQLAlchemy URL of the store (default: MESH_HOME/mesh.db, the router's).")
STORE_ROUTER = typer.Option(None, "--router", help="HOST:PORT of a router serving the Agent service; without it "
                            "(and without $MESH_ROUTER), act on the local store.")


def parse_interval(text: str, option: str = "--interval", *, allow_zero: bool = False) -> float:
    """Seconds in '90', '30s', '10m' or '2h' (0 only with allow_zero); ValueError naming option otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not match:
        raise ValueError(f"{option} {text!r}: use seconds or a number with s, m or h, e.g. 10m")
    value = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if value == 0 and not allow_zero:
        raise ValueError(f"{option} must be > 0")
    return value


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="seconds") if ts else "-"


def _store_router(router: str | None) -> str | None:
    return router or os.environ.get("MESH_ROUTER") or None


def _line(task) -> str:
    what = f"{task.proposal['kind']} {task.proposal['target']} {json.dumps(task.proposal['params'])}" \
        if task.proposal else "-"
    return (f"#{task.id:<4} {task.state:<15} {task.type:<26} subset {'-' if task.subset is None else task.subset}  "
            f"{task.tier or '-':<13} {what}")


@agent_app.command("submit")
def submit(task_type: str = typer.Argument(..., metavar="TYPE", help="scheduler_optimization, "
                                           "security_log_analysis, test_generation, config_tuning or "
                                           "governance_proposal_draft."),
           context: Path = typer.Option(None, "--context", help="Text file attached to the prompt (at most 64 KiB)."),
           kind: list[str] = typer.Option([], "--kind", help="Only propose this action kind (repeatable)."),
           router: str = STORE_ROUTER, db: str = DB) -> None:
    """Queue a self-task (the same as the gRPC SubmitSelfTask); `mesh agent run` picks it up."""
    from mesh_llm.agent import ops

    with friendly_errors():
        text = ops.read_context(context, db=db)
        task = ops.submit_task(task_type, context=text, kinds=tuple(kind), router=_store_router(router), db=db)
        typer.echo(f"queued task #{task.id} ({task.type}; may propose {', '.join(task.kinds)})")


@agent_app.command("run")
def run(interval: str = typer.Option("10m", "--interval", help="Each subset starts a new task this often "
                                     "(queued tasks go first)."),
        subsets: int = typer.Option(1, "--subsets", help="Split the online experts into N disjoint groups, each "
                                    "running its own task concurrently."),
        once: bool = typer.Option(False, "--once", help="Run one task per subset and one follow-up pass, then exit."),
        k: int = typer.Option(2, "--k", help="Experts mixed per token in a task's generation."),
        temperature: float = typer.Option(0.3, "--temperature", help="Sampling temperature (seeded per task)."),
        deadline: str = typer.Option("15m", "--deadline", help="Longest one task may run, its generation included "
                                     "('90s', '15m'); a task past it fails."),
        resume_wait: str = typer.Option("2m", "--resume-wait", help="When the router goes away mid-generation, wait "
                                        "this long for it (and its experts) to be back and resume the generation "
                                        "from its last checkpoint ('0' fails the task at once)."),
        router: str = typer.Option(None, "--router", help="Router HOST:PORT (default: $MESH_ROUTER or "
                                   "127.0.0.1:50050)."),
        db: str = DB,
        key: str = typer.Option("agent", "--key", help="Key under MESH_HOME/keys that signs the agent's proposals; "
                                "the router's members.toml lists it (`mesh members add NAME PUBKEY --role proposer`)."),
        governance_dir: Path = typer.Option(None, "--governance", "--governance-dir", help="Folder with policy.toml "
                                            "and members.toml, the trust root (default: $MESH_GOVERNANCE_DIR, else "
                                            "MESH_HOME/governance, as `mesh router serve` uses).")) -> None:
    """Run the agent loop: observe, ask the mesh, propose, gate; stops at once when the mesh is halted.

    Each task's stages (observe, generate, gate, apply, measure) are shown on stderr; at the end each task's
    proposal, tier and state. Exit 1 when a task failed or its proposal was refused, 3 when the mesh is halted.
    """
    from mesh_llm.agent import ops
    from mesh_llm.agent.loop import AgentConfig
    from mesh_llm.agent.progress import TextProgress
    from mesh_llm.agent.runner import RunnerConfig
    from mesh_llm.agent.tasks import FAILED, REFUSED
    from mesh_llm.cli import logs
    from mesh_llm.governance.policy import trust_root
    from mesh_llm.router.client import DEFAULT_ROUTER

    logs.show_warnings()
    with friendly_errors():
        try:
            seconds = parse_interval(interval, "--interval")
            deadline_s = parse_interval(deadline, "--deadline")
            resume_wait_s = parse_interval(resume_wait, "--resume-wait", allow_zero=True)
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        typer.echo(trust_root(governance_dir).describe(), err=True)
        address = router or os.environ.get("MESH_ROUTER") or DEFAULT_ROUTER
        config = RunnerConfig(agent=AgentConfig(router=address, k=k, temperature=temperature, key=key,
                                                deadline_s=deadline_s, resume_wait_s=resume_wait_s),
                              interval_s=seconds, subsets=subsets, once=once)
        progress = TextProgress(sys.stderr)
        try:
            report = asyncio.run(ops.run_agent(config, db=db, gov_dir=governance_dir, progress=progress))
        except KeyboardInterrupt:
            typer.echo("stopped; running tasks are marked interrupted and requeued at the next start")
            raise typer.Exit(130) from None
        typer.echo(f"ran tasks {report.started or '-'}; followed up {report.followed or '-'}"
                   + (f"; requeued {report.requeued}" if report.requeued else ""))
        finished = [ops.show_task(task_id, db=db) for task_id in report.started]
        for task in finished:
            _summary(task)
        if report.halted:
            typer.secho(f"stopped: the mesh is halted ({report.halt_reason})", fg=typer.colors.RED, err=True)
            raise typer.Exit(3)
        failed = [t.id for t in finished if t.state in (FAILED, REFUSED)]
        if failed:
            typer.secho(f"task(s) {failed} failed or were refused (see `mesh agent show ID`)", fg=typer.colors.RED,
                        err=True)
            raise typer.Exit(1)


def _summary(task) -> None:
    """A finished run's task: its proposal and tier, and how it ended."""
    typer.echo(_line(task))
    if task.proposal:
        typer.echo(f"  rationale: {task.proposal['rationale']}")
    if task.outcome:
        typer.echo(f"  outcome: {task.outcome}")
    if task.error:
        typer.echo(f"  error: {task.error}")


@agent_app.command("tasks")
def tasks(state: str = typer.Option(None, "--state", help="Only tasks in this state."),
          limit: int = typer.Option(50, "--limit", help="Newest N tasks."),
          router: str = STORE_ROUTER, db: str = DB) -> None:
    """List agent tasks, newest first."""
    from mesh_llm.agent import ops

    with friendly_errors():
        found = ops.list_tasks(state=state, limit=limit, router=_store_router(router), db=db)
        if not found:
            typer.echo("no agent tasks")
        for task in found:
            typer.echo(_line(task))


@agent_app.command("show")
def show(task_id: int = typer.Argument(..., metavar="ID"), router: str = STORE_ROUTER, db: str = DB) -> None:
    """Show one task: prompt, raw output, parsed proposal, tier, state, outcome and its audit trail."""
    from mesh_llm.agent import ops

    with friendly_errors():
        remote = _store_router(router)
        task = ops.show_task(task_id, router=remote, db=db)
        typer.echo(_line(task))
        typer.echo(f"  source {task.source}, attempts {task.attempts}, created {_when(task.created_at)}, "
                   f"started {_when(task.started_at)}, finished {_when(task.finished_at)}")
        typer.echo(f"  may propose: {', '.join(task.kinds)}")
        typer.echo(f"  experts: {', '.join(task.expert_ids) or '-'}")
        typer.echo(f"  proposal: {json.dumps(task.proposal) if task.proposal else '-'}"
                   + (f"  (governance #{task.proposal_id})" if task.proposal_id else ""))
        typer.echo(f"  baseline: {json.dumps(task.baseline) if task.baseline else '-'}")
        typer.echo(f"  outcome: {task.outcome or '-'}")
        if task.error:
            typer.echo(f"  error: {task.error}")
        if task.context:
            typer.echo(f"--- context ---\n{task.context}")
        typer.echo(f"--- prompt ---\n{task.prompt or '-'}\n--- raw output ---\n{task.raw_output or '-'}")
        if not remote:
            typer.echo("--- audit ---")
            for row in ops.task_audit(task_id, db=db):
                typer.echo(f"{row.seq:>5} {_when(row.ts)} {row.event} {row.detail[:160]}")


def register(app: typer.Typer) -> None:
    """Add `mesh agent ...` to the `mesh` app."""
    app.add_typer(agent_app, name="agent")
