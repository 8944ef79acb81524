"""`mesh models finetune`: fine-tune a domain expert on a local corpus and register it in the catalog."""

from __future__ import annotations

import typer
from rich.console import Console

from mesh_llm.cli.errors import friendly_errors

console = Console()


def finetune(
    name: str = typer.Argument(..., help="Catalog name of the new expert, e.g. py-expert."),
    corpus: str = typer.Option(..., help="Built-in domain (python, legal, man, prose) or a folder / text file."),
    base: str = typer.Option("smollm2-135m", help="Catalog name or checkpoint folder to fine-tune."),
    tokenizer: str = typer.Option("smollm2-135m", help="Model whose tokenizer the base must share (its family)."),
    steps: int | None = typer.Option(None, help="Optimizer steps (default: the library's measured choice)."),
    lr: float | None = typer.Option(None, help="Peak learning rate."),
    train_layers: int | None = typer.Option(None, help="Train only the last N decoder layers; 0 trains every weight."),
    seq_len: int | None = typer.Option(None, help="Tokens per training sequence."),
    batch_size: int | None = typer.Option(None, help="Sequences per step."),
    seed: int = typer.Option(0, help="Seed of the training order and of the file split."),
    checkpoint_every: int | None = typer.Option(None, help="Steps between resumable checkpoints."),
    resume: bool = typer.Option(False, help="Continue from the last checkpoint of this expert."),
    force: bool = typer.Option(False, help="Replace a catalog entry or model folder of this name not made here."),
) -> None:
    """Fine-tune the base on one corpus (seeded, resumable) and register the result as NAME."""
    from dataclasses import replace

    from mesh_llm.models.corpora import SplitConfig
    from mesh_llm.models.finetune import ExpertJob, TrainConfig, finetune_expert

    given = {"steps": steps, "lr": lr, "train_layers": train_layers, "seq_len": seq_len,
             "batch_size": batch_size, "checkpoint_every": checkpoint_every}
    config = replace(TrainConfig(), seed=seed, **{k: v for k, v in given.items() if v is not None})
    with friendly_errors():
        result = finetune_expert(ExpertJob(name=name, corpus=corpus, base=base, tokenizer=tokenizer, train=config,
                                           split=SplitConfig(seed=seed), resume=resume, force=force))
    console.print(f"[green]ok[/green] {result.name}: held-out NLL {result.heldout_nll:.3f} nats/token "
                  f"(base {result.base_heldout_nll:.3f}) after {result.steps} steps in {result.seconds:.0f} s; "
                  f"{result.checkpoint}")


def register(app: typer.Typer) -> None:
    """Add `finetune` to the `mesh models` group."""
    from mesh_llm.cli.models_cmd import models_app

    models_app.command("finetune")(finetune)
