"""`mesh models ...` and `mesh gpus`."""

from __future__ import annotations

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from mesh_llm.cli.errors import friendly_errors

console = Console()
models_app = typer.Typer(help="The model catalog: list, pull, verify and remove models.", no_args_is_help=True)


@models_app.command("list")
def list_models() -> None:
    """Catalog entries: name and description, size, whether the files are on disk, and their source."""
    from mesh_llm.models.catalog import all_entries
    from mesh_llm.models.fetch import is_fetched

    with friendly_errors():
        entries = all_entries()
        # names never break; descriptions and sources fold, so 80 columns stay readable
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, leading=1, expand=True)
        table.add_column("model", min_width=max(len(e.name) for e in entries), ratio=2, overflow="fold")
        table.add_column("params", no_wrap=True)
        table.add_column("on disk", no_wrap=True)
        table.add_column("source", ratio=1, overflow="fold")
        for entry in entries:
            src = entry.source
            where = getattr(src, "package", None) or getattr(src, "repo_id", None) or str(getattr(src, "path", ""))
            table.add_row(f"[bold]{entry.name}[/bold]\n[dim]{entry.description}[/dim]", entry.approx_params,
                          "yes" if is_fetched(entry) else "no", where)
        console.print(table)


@models_app.command("pull")
def pull_model(
    name: str = typer.Argument("smollm2-135m", help="Catalog name, .gguf file or checkpoint folder."),
    force: bool = typer.Option(False, help="Download again even if the files look complete."),
    convert: bool = typer.Option(True, help="Convert a GGUF file to the fast-loading safetensors cache now."),
) -> None:
    """Fetch a model with a progress bar, verify its digest, and convert it once."""
    from mesh_llm.errors import MeshError
    from mesh_llm.models.catalog import LocalSource, resolve
    from mesh_llm.models.checks import ModelFileError
    from mesh_llm.models.fetch import pull, pull_hint
    from mesh_llm.models.loading import checkpoint_for

    with friendly_errors():
        entry = resolve(name)
        try:
            path = pull(entry, force=force)
        except ModelFileError as exc:  # its fix says to run this very command
            if isinstance(entry.source, LocalSource):
                raise
            raise MeshError(str(exc).replace(
                pull_hint(entry), "the files just downloaded fail the catalog's check, so downloading again will "
                "not help: the source changed or the catalog entry's size or sha256 is wrong (see "
                "MESH_HOME/catalog.toml)")) from None
        console.print(f"[green]ok[/green] {entry.name}: {path}")
        if convert:
            console.print(f"checkpoint: {checkpoint_for(entry)}")


@models_app.command("verify")
def verify_model(name: str = typer.Argument("smollm2-135m", help="Catalog name or path.")) -> None:
    """Check size and sha256 of a model's files and name any that are missing or damaged."""
    from mesh_llm.models.catalog import resolve
    from mesh_llm.models.fetch import locate

    with friendly_errors():
        path = locate(resolve(name), deep=True)
        console.print(f"[green]ok[/green] {path}")


@models_app.command("rm")
def remove_model(name: str = typer.Argument(..., help="Catalog name.")) -> None:
    """Delete a model's downloaded and converted files from MESH_HOME."""
    from mesh_llm.models.catalog import resolve
    from mesh_llm.models.fetch import remove

    with friendly_errors():
        console.print("removed" if remove(resolve(name)) else "nothing to remove")


def gpus() -> None:
    """What accelerators and 4-bit backends this machine really has (each is probed by running it)."""
    from mesh_llm.models.devices import probe_devices

    table = Table("device", "name", "memory GiB", "bf16", "bitsandbytes NF4")
    for report in probe_devices():
        nf4 = "works" if report.nf4_works else f"no ({report.nf4_note})"
        table.add_row(report.device, report.name, f"{report.memory_gib:.1f}",
                      "yes" if report.bf16_supported else "no", nf4)
    console.print(table)
    import torch

    if not torch.cuda.is_available():
        console.print("No CUDA device: experts run on the CPU (--device cpu; auto picks it).")


def register(app: typer.Typer) -> None:
    """Add the models group and the gpus command to the mesh app."""
    app.add_typer(models_app, name="models")
    app.command("gpus")(gpus)
