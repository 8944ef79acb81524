"""The `mesh` command: every sub-command group registers itself here."""

from __future__ import annotations

import typer

from mesh_llm.cli import logs

app = typer.Typer(
    help="mesh-llm: K of N donated language models mixed per token over gRPC.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(ctx: typer.Context,
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Log to stderr, with debug detail (commands "
                                      "other than `mesh router` and `mesh demo` log nothing without it).")) -> None:
    """mesh-llm operator, researcher and governance commands."""
    logs.configure(verbose, quiet=ctx.invoked_subcommand not in logs.SERVICE_COMMANDS)


def _register_groups() -> None:
    from mesh_llm.cli import agent_cmd, credits_cmd, finetune_cmd, governance_cmd, models_cmd, router_cmd

    router_cmd.register(app)
    models_cmd.register(app)
    governance_cmd.register(app)
    agent_cmd.register(app)
    finetune_cmd.register(app)
    credits_cmd.register(app)


_register_groups()
if __name__ == "__main__":
    app()
