"""Loading a catalog model (GGUF, checkpoint folder, or NF4 via bitsandbytes) onto a device."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh_llm.errors import MeshError
from mesh_llm.models.catalog import CatalogEntry, resolve
from mesh_llm.models.checks import ModelFileError, check_checkpoint
from mesh_llm.models.convert import ensure_converted
from mesh_llm.models.fetch import locate, pull_hint
from mesh_llm.models.fingerprint import tokenizer_fingerprint

log = logging.getLogger(__name__)

QUANTS = ("none", "nf4")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


class LoadError(MeshError):
    """The model could not be loaded with the requested options."""


@dataclass(frozen=True, kw_only=True)
class LoadOptions:
    model: str  # catalog name, .gguf file or checkpoint folder
    quant: str = "none"  # none or nf4 (bitsandbytes 4-bit)
    dtype: str = "float32"  # compute dtype of weights (and of NF4 matmuls)
    device: str = "auto"  # auto picks cuda when present, else cpu; or cpu, cuda, cuda:N


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    model: Any  # transformers causal LM in eval mode
    tokenizer: Any  # its tokenizer
    model_id: str  # catalog name (or ad-hoc name of a path)
    device: str  # torch device string the model runs on
    dtype: str  # compute dtype name
    quantization: str  # none or nf4
    fingerprint: str  # tokenizer fingerprint
    vocab_size: int  # rows of the output distribution
    context_limit: int  # most positions a session may hold
    eos_token_ids: tuple[int, ...]  # ids that end a generation
    kv_bytes_per_token: int  # KV-cache bytes one token costs in a session


def resolve_device(device: str) -> str:
    """Concrete torch device for auto, cpu, cuda or cuda:N; a clear error when CUDA is absent."""
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise LoadError(f"unknown device {device!r}; use one of auto, cpu, cuda, cuda:N")
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoadError(f"--device {device} asked for CUDA but torch sees no CUDA device; "
                        "use --device cpu (or auto), and see `mesh gpus`")
    return "cuda:0" if device == "cuda" else device


def checkpoint_for(entry: CatalogEntry) -> Path:
    """Checkpoint folder to load for an entry: the folder itself, or the cached conversion of its GGUF."""
    path = locate(entry, deep=False)
    if path.is_dir():
        return path
    return ensure_converted(path, entry.converted_dir)


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids = set()
    for source in (model.generation_config.eos_token_id if model.generation_config else None,
                   model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return tuple(sorted(ids))


def _kv_bytes_per_token(config, element_size: int) -> int:
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * element_size


def load(options: LoadOptions) -> LoadedModel:
    """Resolve, check, convert if needed and load a model with the requested quantisation, dtype and device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if options.quant not in QUANTS:
        raise LoadError(f"unknown quantisation {options.quant!r}; use one of {', '.join(QUANTS)}")
    if options.dtype not in DTYPES:
        raise LoadError(f"unknown dtype {options.dtype!r}; use one of {', '.join(DTYPES)}")
    entry = resolve(options.model)
    device = resolve_device(options.device)
    checkpoint = checkpoint_for(entry)
    fix = pull_hint(entry)
    check_checkpoint(checkpoint, fix)
    torch_dtype = getattr(torch, options.dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if options.quant == "nf4":
        kwargs["quantization_config"] = _nf4_config(torch_dtype)
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelFileError(f"could not load {checkpoint} ({type(exc).__name__}: {exc}); {fix}") from None
    if options.quant == "none":
        model.to(device)
    model.eval()
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id=entry.name, device=device, dtype=options.dtype,
        quantization=options.quant, fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]) if options.quant == "none"
        else int(model.config.vocab_size),
        context_limit=int(getattr(model.config, "max_position_embeddings", 2048)),
        eos_token_ids=_eos_ids(model, tokenizer),
        kv_bytes_per_token=_kv_bytes_per_token(model.config, torch.finfo(torch_dtype).bits // 8),
    )


def _nf4_config(compute_dtype):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise LoadError(f"--quant nf4 needs bitsandbytes ({exc}); pip install bitsandbytes") from None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
