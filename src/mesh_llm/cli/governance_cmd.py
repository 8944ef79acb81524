"""`mesh keys|members|halt|resume|proposals|vote|audit|phase`: governance commands."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path

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
GOV = typer.Option(None, "--governance", help="Folder with policy.toml and members.toml, the governance trust root "
                   "(default: $MESH_GOVERNANCE_DIR, else MESH_HOME/governance; never ./governance).")


def _trust_root(gov_dir: Path | None, router: str | None = None) -> None:
    """Say on stderr which trust root a local command uses (with --router the router's own is used)."""
    from mesh_llm.governance.policy import trust_root

    if not router:
        typer.echo(trust_root(gov_dir).describe(), err=True)


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(timespec="seconds") if ts else "-"


def _echo_halt(state: HaltState) -> None:
    if state.halted:
        typer.echo(f"HALTED (halt {state.halt_id}) by {state.halted_by} at {_when(state.halted_at)}: {state.reason}")
        voters = ', '.join(state.resume_votes) or '-'
        typer.echo(f"resume votes {len(state.resume_votes)}/{state.resume_required}: {voters}")
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


@keys_app.command("list")
def keys_list() -> None:
    """Print every key under MESH_HOME/keys with its public key (what `mesh members add` takes)."""
    from mesh_llm.governance import keys
    from mesh_llm.governance.errors import KeyStoreError

    with friendly_errors():
        names = keys.key_names()
        if not names:
            typer.echo(f"no keys in {keys.keys_dir()}; create one with `mesh keys new NAME`")
        for name in names:
            try:
                typer.echo(f"{name}  {keys.public_key_of(name)}")
            except KeyStoreError as exc:
                typer.echo(f"{name}  unusable: {exc}")


@keys_app.command("show")
def keys_show(name: str = typer.Argument(..., help="Key name.")) -> None:
    """Print the public key of key NAME again."""
    from mesh_llm.governance import keys

    with friendly_errors():
        typer.echo(keys.public_key_of(name))


@members_app.command("add")
def members_add(name: str, public_key: str = typer.Argument(..., help="Base64 public key from `mesh keys new`."),
                role: str = typer.Option("member", "--role", help="member (votes, halts, resumes, proposes) or "
                                         "proposer (signs proposals only, e.g. the agent's key)."),
                gov_dir: Path = GOV) -> None:
    """Add a member (or a proposer) to members.toml."""
    with friendly_errors():
        _trust_root(gov_dir)
        member = ops.members_add(name, public_key, role=role, gov_dir=gov_dir)
        typer.echo(f"added {member.name}" + (f" ({member.role})" if member.role != "member" else ""))


@members_app.command("list")
def members_list(gov_dir: Path = GOV) -> None:
    """List members, their roles and public keys."""
    with friendly_errors():
        _trust_root(gov_dir)
        for member in ops.members_list(gov_dir=gov_dir):
            typer.echo(f"{member.name}  {member.role}  {member.public_key}")


def halt(reason: str = typer.Option(..., "--reason", help="Why you are stopping the mesh."), key: str = KEY,
         router: str = ROUTER, db: str = DB, gov_dir: Path = GOV) -> None:
    """Halt the mesh now (any single member); it stays halted until a quorum resumes it."""
    with friendly_errors():
        _trust_root(gov_dir, router)
        _echo_halt(ops.halt_mesh(key=key, reason=reason, router=router, db=db, gov_dir=gov_dir))


def resume(key: str = KEY, router: str = ROUTER, db: str = DB, gov_dir: Path = GOV) -> None:
    """Vote to resume a halted mesh; it resumes when the resume quorum is met."""
    with friendly_errors():
        _trust_root(gov_dir, router)
        _echo_halt(ops.resume_mesh(key=key, router=router, db=db, gov_dir=gov_dir))


def vote(proposal_id: int = typer.Argument(..., metavar="ID"),
         choice: str = typer.Argument(..., metavar="approve|reject"), key: str = KEY, router: str = ROUTER,
         db: str = DB, gov_dir: Path = GOV) -> None:
    """Sign and cast your vote on a proposal."""
    with friendly_errors():
        if choice not in ("approve", "reject"):
            raise typer.BadParameter("choose approve or reject", param_hint="CHOICE")
        _trust_root(gov_dir, router)
        _echo_proposal(ops.cast_vote(proposal_id=proposal_id, choice=choice, key=key, router=router, db=db,
                                     gov_dir=gov_dir), full=False)


@proposals_app.command("list")
def proposals_list(status: str = typer.Option(None, "--status", help="Only this status (open, approved, ...)."),
                   router: str = ROUTER, db: str = DB, gov_dir: Path = GOV) -> None:
    """List proposals, newest first."""
    with friendly_errors():
        _trust_root(gov_dir, router)
        found = ops.list_proposals(status=status, router=router, db=db, gov_dir=gov_dir)
        for p in found:
            _echo_proposal(p, full=False)
        if not found:
            typer.echo("no proposals")


@proposals_app.command("show")
def proposals_show(proposal_id: int = typer.Argument(..., metavar="ID"), router: str = ROUTER, db: str = DB,
                   gov_dir: Path = GOV) -> None:
    """Show one proposal with its votes."""
    with friendly_errors():
        _trust_root(gov_dir, router)
        _echo_proposal(ops.show_proposal(proposal_id, router=router, db=db, gov_dir=gov_dir), full=True)


@audit_app.command("show")
def audit_show(limit: int = typer.Option(50, "--limit", help="Last N rows (0 = all)."), router: str = ROUTER,
               db: str = DB, gov_dir: Path = GOV) -> None:
    """Print the last audit rows."""
    with friendly_errors():
        _trust_root(gov_dir, router)
        for row in ops.audit_show(limit=limit or None, router=router, db=db, gov_dir=gov_dir):
            typer.echo(f"{row.seq:>6} {_when(row.ts)} {row.event:<20} {row.actor:<12} {row.detail}")


@audit_app.command("verify")
def audit_verify(router: str = ROUTER, db: str = DB, gov_dir: Path = GOV) -> None:
    """Walk the hash chain, check its signed head, and cross-check halts, votes and actions against it."""
    with friendly_errors():
        _trust_root(gov_dir, router)
        result = ops.audit_verify(router=router, db=db, gov_dir=gov_dir)
    if result.ok:
        typer.echo(f"audit chain ok: {result.checked} rows, head signature and state tables agree")
        return
    where = f" at row {result.first_bad_seq}" if result.first_bad_seq else ""
    typer.secho(f"audit chain BROKEN{where}: {result.problem}", fg=typer.colors.RED, err=True)
    for line in result.mismatches:
        typer.secho(f"  {line}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@phase_app.command("show")
def phase_show(router: str = ROUTER, db: str = DB, gov_dir: Path = GOV) -> None:
    """Show the current phase and the tiers and features it enables."""
    with friendly_errors():
        _trust_root(gov_dir, router)
        info = ops.phase_show(router=router, db=db, gov_dir=gov_dir)
        typer.echo(f"phase {info.phase}: {info.rule.description}")
        typer.echo(f"tiers: {', '.join(t if isinstance(t, str) else t.value for t in info.rule.tiers)}")
        typer.echo(f"features: {', '.join(info.rule.features) or '-'}")


@phase_app.command("propose")
def phase_propose(phase: int = typer.Argument(..., metavar="N", min=0, max=3), key: str = KEY,
                  rationale: str = typer.Option("", "--rationale"), router: str = ROUTER, db: str = DB,
                  gov_dir: Path = GOV) -> None:
    """Sign and propose moving the mesh to phase N (decided by a full vote); you are its author."""
    with friendly_errors():
        _trust_root(gov_dir, router)
        _echo_proposal(ops.phase_propose(phase, key=key, rationale=rationale, router=router, db=db,
                                         gov_dir=gov_dir), full=True)


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
