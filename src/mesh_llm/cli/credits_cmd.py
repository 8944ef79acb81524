"""`mesh credits`: the credit ledger, per donor and expert, read from the store."""

from __future__ import annotations

from collections import Counter

import typer
from rich.console import Console
from rich.table import Table

from mesh_llm.cli.errors import friendly_errors

console = Console()


def credits(db: str = typer.Option(None, "--db", help="SQLAlchemy URL of the router's store (default: $MESH_STORE, "
                                   "else MESH_HOME/mesh.db)."),
            donor: str = typer.Option("", help="Show only donors whose id starts with this.")) -> None:
    """Credits earned by each donor's experts: one per token an expert contributed to a mixture."""
    from mesh_llm.router.credits import read_ledger
    from mesh_llm.store.db import open_engine

    with friendly_errors():
        engine = open_engine(db)
        try:
            rows = [r for r in read_ledger(engine) if r.donor.startswith(donor)]
        finally:
            engine.dispose()
    if not rows:
        console.print("no credits yet: donors earn one per token their experts contribute to a mixture")
        return
    totals = Counter()
    for r in rows:
        totals[r.donor] += r.tokens
    table = Table("donor", "expert", "credits")
    for r in rows:
        table.add_row(_donor(r.donor), r.expert_id, str(r.tokens))
    console.print(table)
    for who, total in totals.most_common():
        console.print(f"donor {_donor(who)}: {total} credits")


def _donor(identity: str) -> str:
    return identity[:16] if identity else "(no key)"


def register(app: typer.Typer) -> None:
    """Add the credits command."""
    app.command("credits")(credits)
