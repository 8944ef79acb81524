"""Terminal rendering: a streaming generation with tokens coloured by their experts, and the expert table."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mesh_llm.pb import router_pb2

# header, justify, narrowest width: only expert and model fold when the terminal is narrow (80 columns fit)
STATUS_COLUMNS = (("expert", "left", 14), ("model", "left", 12), ("state", "left", 0), ("RTT ms", "right", 0),
                  ("tok/s", "right", 0), ("fails", "right", 0), ("served", "right", 0))
PALETTE = ["cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta"]


class StreamPrinter:
    """Prints token text as it arrives, coloured per set of contributing experts, then a summary."""

    def __init__(self, console: Console, names: dict[str, str] | None = None, colour: bool = True):
        self.console = console
        self.names = names or {}
        self.colour = colour
        self.styles: dict[tuple[str, ...], str] = {}
        self.contributions: Counter[str] = Counter()
        self.tokens = 0

    def name(self, expert_id: str) -> str:
        """Display name of an expert (its label, else its id)."""
        return self.names.get(expert_id) or expert_id

    def token(self, event: router_pb2.TokenEvent) -> None:
        """Print one token's text in the colour of its expert set."""
        key = tuple(sorted(event.expert_ids))
        style = self.styles.setdefault(key, PALETTE[len(self.styles) % len(PALETTE)])
        self.contributions.update(event.expert_ids)
        self.tokens += 1
        self.console.print(Text(event.text, style=style if self.colour else ""), end="", soft_wrap=True)

    def done(self, done: router_pb2.GenerationDone) -> None:
        """Print the finish reason, speed, notes and who contributed."""
        self.console.print()
        if done.completion_tokens:
            self.console.print(
                f"[dim]finish: {done.finish_reason} · {done.completion_tokens} tokens · "
                f"{done.tokens_per_second:.2f} tokens/s · first token after {done.time_to_first_token_s:.2f} s[/dim]")
        else:
            self.console.print(f"[red]finish: {done.finish_reason} before the first token[/red]")
        for note in done.notes:
            self.console.print(f"[yellow]note:[/yellow] {note}")
        if self.styles:
            legend = Text("colours: ")
            for key, style in self.styles.items():
                legend.append(" + ".join(self.name(e) for e in key), style=style)
                legend.append("  ")
            self.console.print(legend)
        table = Table("expert", "tokens contributed")
        for expert_id, count in self.contributions.most_common():
            table.add_row(self.name(expert_id), str(count))
        self.console.print(table)


async def print_stream(printer: StreamPrinter,
                       events: AsyncIterator[router_pb2.GenerateEvent]) -> router_pb2.GenerationDone:
    """Print a whole Generate stream through printer and return its final summary."""
    done = None
    async for event in events:
        if event.HasField("token"):
            printer.token(event.token)
        else:
            done = event.done
    printer.done(done)
    return done


def status_table(experts: Sequence[router_pb2.ExpertStatus]) -> Table:
    """The experts of a RouterStatus as a table whose headers stay whole in an 80-column terminal."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, leading=1)
    for header, justify, narrowest in STATUS_COLUMNS:
        table.add_column(header, justify=justify, min_width=max(len(header), narrowest), overflow="fold",
                         no_wrap=not narrowest)
    for e in experts:
        who = f"{e.name}\n[dim]{e.expert_id}[/dim]" if e.name and e.name != e.expert_id else e.expert_id
        model = f"{e.model_id}\n[dim]{e.device} {e.quantization}\ntok {e.tokenizer_fingerprint[:8]}[/dim]"
        table.add_row(who, model, f"{e.state}\n[dim]weight {e.weight:g}\ntrust {e.trust:.2f}[/dim]",
                      f"{e.rtt_ms:.1f}",
                      f"{e.tokens_per_second:.1f}", str(e.failures), str(e.tokens_served))
    return table
