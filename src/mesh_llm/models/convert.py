"""One-time conversion of a GGUF file into a safetensors checkpoint that loads in a fraction of a second."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from mesh_llm.errors import MeshError
from mesh_llm.models.checks import ModelFileError, check_checkpoint

log = logging.getLogger(__name__)
MANIFEST = "mesh_manifest.json"


def _source_stamp(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"source": str(gguf), "source_size": stat.st_size, "source_mtime_ns": stat.st_mtime_ns}


def is_converted(gguf: Path, out_dir: Path) -> bool:
    """Whether out_dir holds a complete conversion of this very GGUF file."""
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())
        check_checkpoint(out_dir, "it will be converted again")
    except (ValueError, ModelFileError):
        return False
    stamp = _source_stamp(gguf)
    return all(recorded.get(k) == v for k, v in stamp.items())


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file with transformers and save model and tokenizer as safetensors in out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors checkpoint (once; later starts load the cache)", gguf.name)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
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
    (staging / MANIFEST).write_text(json.dumps(_source_stamp(gguf), indent=1))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.replace(out_dir)
    return out_dir


def ensure_converted(gguf: Path, out_dir: Path) -> Path:
    """The converted checkpoint for gguf, converting only when missing or stale."""
    if is_converted(gguf, out_dir):
        return out_dir
    return convert_gguf(gguf, out_dir)
