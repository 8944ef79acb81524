"""Where a running agent task says how far it got: observe, generate, gate, apply, measure."""

from __future__ import annotations

from typing import TextIO

STAGES = ("observe", "generate", "gate", "apply", "measure")


class Progress:
    """Receives a task's stages and its generated-token count; this base class shows nothing."""

    def stage(self, task_id: int, stage: str, text: str) -> None:
        """Task task_id reached stage (one of STAGES); text says what happened there."""

    def tokens(self, task_id: int, count: int) -> None:
        """Task task_id has generated count tokens so far."""


class TextProgress(Progress):
    """One line per stage on a text stream; the token counter rewrites its line on a terminal."""

    def __init__(self, stream: TextIO, *, tty: bool | None = None, every: int = 32) -> None:
        """Write to stream; off a terminal, the counter prints a line every `every` tokens."""
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every = every
        self._counting: int | None = None  # task whose counter line is open on the terminal

    def _end_counter(self) -> None:
        if self._counting is not None:
            self.stream.write("\n")
            self._counting = None

    def stage(self, task_id: int, stage: str, text: str) -> None:
        """Print `task #N stage: text`."""
        self._end_counter()
        self.stream.write(f"task #{task_id} {stage}: {text}\n")
        self.stream.flush()

    def tokens(self, task_id: int, count: int) -> None:
        """Rewrite the counter on a terminal, else print it every `every` tokens."""
        if self.tty:
            if self._counting not in (None, task_id):
                self._end_counter()
            self._counting = task_id
            self.stream.write(f"\rtask #{task_id} generate: {count} tokens")
        elif count % self.every == 0:
            self.stream.write(f"task #{task_id} generate: {count} tokens\n")
        self.stream.flush()
