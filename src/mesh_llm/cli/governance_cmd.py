"""`mesh keys|members|halt|resume|proposals|vote|audit|phase`: governance commands."""

from __future__ import annotations

import datetime
import json
import logging

import typer

from mesh_llm.cli.errors import friendly_errors
from mesh_llm.governance import ops
from mesh_llm.governance.killswitch import HaltState
from mesh_llm.governance.proposals import ProposalView

log = logging.getLogger(__name__)

keys_app = typer.Typer(help="Ed25519 signing keys of governance members.", no_args_is_help=True)
members_app = typer.Typer(help="Governance members (governance/members.toml).", no_args_is_help=True)
proposals_app = typer.Typer(help="Proposals and their votes.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit log.", no_args_is_help=True)
phase_app = typer.Typer(help="The mesh's phase (which tiers and features are enabled).", no_args_is_help=True)

ROUTER = typer.Option(None, "--router", help="HOST:PORT of a router; without it, act on the local store.")
DB = typer.Option(None, "--db", help="SQLAlchemy URL of the local store (default: MESH_HOME/mesh.db).")
KEY = typer.Option(..., "--key", help="Your key name under MESH_HOME/keys (= your member name).")


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="seconds") if ts else "-"


def _echo_halt(state: HaltState) -> None:
    if state.halted:
        typer.echo(f"HALTED (halt {state.halt_id}) by {state.halted_by} at {_when(state.halted_at)}: {state.reason}")
        typer.echo(f"resume votes {len(state.resume_votes)}/{state.resume_required}: {', '.join(state.resume_votes) or '-'}")
    else:
        typer.echo("running (not halted)")


def _echo_proposal(p: ProposalView, *, full: bool) -> None:
    typer.echo(f"#{p.id} {p.status:<9} {p.tier:<13} {p.kind} {p.target} {json.dumps(p.params, sort_keys=True)}"
               f"  votes {p.approvals}+/{p.rejections}- of {p.required}")
    if full:
        typer.echo(f"  author: {p.author}   phase: {p.phase}   tier reason: {p.tier_reason}")
        typer.echo(f"  created {_when(p.created_at)}, eligible {_when(p.eligible_at)}, decided {_when(p.decided_at)}"
                   f", sandbox {p.sandbox or '-'}")
        typer.echo(f"  rationale: {p.rationale}")
        for member, choice in p.votes:
            typer.echo(f"  {member}: {choice}")


@keys_app.command("new")
def keys_new(name: str = typer.Argument(..., help="Key (and member) name.")) -> None:
    """Create an Ed25519 key pair under MESH_HOME/keys and print the public key."""
    with friendly_errors():
        typer.echo(ops.new_key(name))


@members_app.command("add")
def members_add(name: str, public_key: str = typer.Argument(..., help="Base64 public key from `mesh keys new`.")) -> None:
    """Add a member to members.toml."""
    with friendly_errors():
        member = ops.members_add(name, public_key)
        typer.echo(f"added {member.name}")


@members_app.command("list")
def members_list() -> None:
    """List members and their public keys."""
    with friendly_errors():
        for member in ops.members_list():
            typer.echo(f"{member.name}  {member.public_key}")


def halt(reason: str = typer.Option(..., "--reason", help="Why you are stopping the mesh."), key: str = KEY,
         router: str = ROUTER, db: str = DB) -> None:
    """Halt the mesh now (any single member); it stays halted until a quorum resumes it."""
    with friendly_errors():
        _echo_halt(ops.halt_mesh(key=key, reason=reason, router=router, db=db))


def resume(key: str = KEY, router: str = ROUTER, db: str = DB) -> None:
    """Vote to resume a halted mesh; it resumes when the resume quorum is met."""
    with friendly_errors():
        _echo_halt(ops.resume_mesh(key=key, router=router, db=db))


def vote(proposal_id: int = typer.Argument(..., metavar="ID"),
         choice: str = typer.Argument(..., metavar="approve|reject"), key: str = KEY, router: str = ROUTER,
         db: str = DB) -> None:
    """Sign and cast your vote on a proposal."""
    with friendly_errors():
        if choice not in ("approve", "reject"):
            raise typer.BadParameter("choose approve or reject", param_hint="CHOICE")
        _echo_proposal(ops.cast_vote(proposal_id=proposal_id, choice=choice, key=key, router=router, db=db), full=False)


@proposals_app.command("list")
def proposals_list(status: str = typer.Option(None, "--status", help="Only this status (open, approved, ...)."),
                   router: str = ROUTER, db: str = DB) -> None:
    """List proposals, newest first."""
    with friendly_errors():
        found = ops.list_proposals(status=status, router=router, db=db)
        for p in found:
            _echo_proposal(p, full=False)
        if not found:
            typer.echo("no proposals")


@proposals_app.command("show")
def proposals_show(proposal_id: int = typer.Argument(..., metavar="ID"), router: str = ROUTER, db: str = DB) -> None:
    """Show one proposal with its votes."""
    with friendly_errors():
        _echo_proposal(ops.show_proposal(proposal_id, router=router, db=db), full=True)


@audit_app.command("show")
def audit_show(limit: int = typer.Option(50, "--limit", help="Last N rows (0 = all)."), router: str = ROUTER,
               db: str = DB) -> None:
    """Print the last audit rows."""
    with friendly_errors():
        for row in ops.audit_show(limit=limit or None, router=router, db=db):
            typer.echo(f"{row.seq:>6} {_when(row.ts)} {row.event:<20} {row.actor:<12} {row.detail}")


@audit_app.command("verify")
def audit_verify(router: str = ROUTER, db: str = DB) -> None:
    """Walk the hash chain; name the first edited, deleted or reordered row."""
    with friendly_errors():
        result = ops.audit_verify(router=router, db=db)
    if result.ok:
        typer.echo(f"audit chain ok: {result.checked} rows")
        return
    typer.secho(f"audit chain BROKEN at row {result.first_bad_seq}: {result.problem}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@phase_app.command("show")
def phase_show(router: str = ROUTER, db: str = DB) -> None:
    """Show the current phase and the tiers and features it enables."""
    with friendly_errors():
        info = ops.phase_show(router=router, db=db)
        typer.echo(f"phase {info.phase}: {info.rule.description}")
        typer.echo(f"tiers: {', '.join(t if isinstance(t, str) else t.value for t in info.rule.tiers)}")
        typer.echo(f"features: {', '.join(info.rule.features) or '-'}")


@phase_app.command("propose")
def phase_propose(phase: int = typer.Argument(..., metavar="N", min=0, max=3),
                  author: str = typer.Option("cli", "--author", help="Who proposes it."),
                  rationale: str = typer.Option("", "--rationale"), router: str = ROUTER, db: str = DB) -> None:
    """Propose moving the mesh to phase N (decided by a full vote)."""
    with friendly_errors():
        _echo_proposal(ops.phase_propose(phase, author=author, rationale=rationale, router=router, db=db), full=True)


def register(app: typer.Typer) -> None:
    """Add the governance commands to the `mesh` app."""
    app.add_typer(keys_app, name="keys")
    app.add_typer(members_app, name="members")
    app.add_typer(proposals_app, name="proposals")
    app.add_typer(audit_app, name="audit")
    app.add_typer(phase_app, name="phase")
    app.command("halt")(halt)
    app.command("resume")(resume)
    app.command("vote")(vote)
