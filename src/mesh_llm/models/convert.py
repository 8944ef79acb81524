"""One-time conversion of a GGUF file into a safetensors checkpoint that loads in a fraction of a second.

Several processes may start on one model at once (a donor with two GPUs starts two experts): a file
lock per model serialises the conversion, each conversion writes into its own staging folder, and the
finished folder is put in place with one rename, so a process that waited loads the finished cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from mesh_llm.errors import MeshError
from mesh_llm.models.checks import ModelFileError, check_checkpoint, sha256_file

log = logging.getLogger(__name__)
MANIFEST = "mesh_manifest.json"


@contextlib.contextmanager
def file_lock(path: Path, doing: str) -> Iterator[bool]:
    """Hold an exclusive cross-process lock on path (created if missing); yields whether it had to wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        waited = False
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process is %s; waiting for it to finish (lock %s)", doing, path)
            fcntl.flock(fh, fcntl.LOCK_EX)
            waited = True
        try:
            yield waited
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _source_stamp(gguf: Path, sha256: str | None = None) -> dict:
    stat = gguf.stat()
    return {"source": str(gguf), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
            "source_sha256": sha256 or sha256_file(gguf)}


def _write_manifest(folder: Path, stamp: dict) -> None:
    staged = folder / f"{MANIFEST}.{uuid.uuid4().hex[:8]}"
    staged.write_text(json.dumps(stamp, indent=1))
    staged.replace(folder / MANIFEST)


def is_converted(gguf: Path, out_dir: Path) -> bool:
    """Whether out_dir holds a complete conversion of a GGUF file with the same sha256 as this one.

    The digest is the key, so a copied or moved MESH_HOME keeps its cache; the file's path, size and
    mtime only spare re-hashing a file that has not changed since it was last hashed.
    """
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
        check_checkpoint(out_dir, "it will be converted again")
    except (ValueError, ModelFileError):
        return False
    stat = gguf.stat()
    if recorded.get("source_size") != stat.st_size:
        return False
    if recorded.get("source") == str(gguf) and recorded.get("source_mtime_ns") == stat.st_mtime_ns:
        return True
    if "source_sha256" not in recorded:
        return False
    digest = sha256_file(gguf)
    if digest != recorded["source_sha256"]:
        return False
    log.info("%s has the digest the converted checkpoint was made from: reusing %s", gguf.name, out_dir)
    _write_manifest(out_dir, _source_stamp(gguf, digest))
    return True


def _install(staging: Path, out_dir: Path) -> None:
    """Put staging at out_dir with one rename; a stale out_dir is renamed aside first, then deleted."""
    aside = None
    if out_dir.exists():
        aside = out_dir.with_name(f"{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        out_dir.rename(aside)
    staging.rename(out_dir)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _remove_leftovers(out_dir: Path) -> None:
    """Delete staging and set-aside folders of conversions that died (only the lock holder may call this)."""
    for pattern in (f"{out_dir.name}.partial*", f"{out_dir.name}.old-*"):
        for leftover in out_dir.parent.glob(pattern):
            log.info("removing %s left by an interrupted conversion", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file with transformers and save model and tokenizer as safetensors in out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors checkpoint (once; later starts load the cache)", gguf.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as exc:  # the GGUF reader raises many types on a damaged file
            raise MeshError(f"could not read GGUF file {gguf} ({type(exc).__name__}: {exc}); "
                            "the file may be truncated or not a GGUF model") from None
        # a GGUF-loaded config keeps quantization_config (gguf); a later NF4 load refuses to mix the two
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None  # the weights are plain float32 now
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _write_manifest(staging, _source_stamp(gguf))
        _install(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return out_dir


def ensure_converted(gguf: Path, out_dir: Path) -> Path:
    """The converted checkpoint for gguf, converting only when missing or stale (one process at a time)."""
    if is_converted(gguf, out_dir):
        return out_dir
    with file_lock(out_dir.with_name(f"{out_dir.name}.lock"), f"converting {gguf.name}"):
        if is_converted(gguf, out_dir):
            log.info("loading the checkpoint another process converted from %s", gguf.name)
            return out_dir
        _remove_leftovers(out_dir)
        return convert_gguf(gguf, out_dir)
