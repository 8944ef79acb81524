"""Machine facts, JSON-lines files and small statistics shared by every experiment."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def machine_info() -> dict:
    """CPU, cores, memory, library versions and git commit of the machine running the experiment."""
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_gib, "gpu": _gpu_name(torch),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "git_commit": git_commit(), "kernel": platform.release(),
        "load_average": [round(x, 2) for x in os.getloadavg()],  # other work on the machine when this started
    }


def _gpu_name(torch) -> str | None:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def git_commit() -> str:
    """Short commit of the working tree (with '+dirty' when files differ), or 'unknown'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that ran a script (its __file__ and arguments) as a shell line from the repository root."""
    script = Path(script)
    try:
        script = script.resolve().relative_to(REPO)
    except ValueError:
        pass
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", str(script), *args])


def write_jsonl(path: Path, rows: Iterable[dict], append: bool = False) -> Path:
    """Write rows as JSON lines (creating folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=_jsonable) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of values, NaN when there are none."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else math.nan


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean, NaN when there are no values."""
    return float(np.mean(values)) if len(values) else math.nan


def parse_list(text: str, kind=float) -> list:
    """Comma-separated values converted with kind ('1,2,4' -> [1, 2, 4])."""
    return [kind(x) for x in text.split(",") if x.strip()]


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table of rows; columns are (key, header, format spec) triples."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
             "|" + "|".join(" ---: " if f else " --- " for _, _, f in columns) + "|"]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("–")
            elif fmt:
                cells.append(format(value, fmt))
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_header(meta: dict) -> str:
    """The commit, command and load averages of the run behind a generated table (a paragraph)."""
    machine = meta.get("machine", {})
    return (f"Generated from commit `{machine.get('git_commit', '?')}` by `{meta.get('command', '?')}`; load average "
            f"{machine.get('load_average', '?')} at the start, {meta.get('load_average_end', '?')} at the end.\n\n")
