"""Integrity checks on model files: sizes, digests, safetensors headers, shard lists."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from tqdm import tqdm

from mesh_llm.errors import MeshError


class ModelFileError(MeshError):
    """A model file is missing, truncated or corrupt; the message names it and the fix."""


def sha256_file(path: Path, *, progress: bool = False) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                     desc=f"checking {path.name}", disable=not progress) as bar:
        while chunk := fh.read(4 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def check_file(path: Path, *, size: int | None, sha256: str | None, fix: str, deep: bool = True) -> None:
    """Raise ModelFileError unless path exists with the expected size (and digest when deep)."""
    if not path.is_file():
        raise ModelFileError(f"model file {path} is missing; {fix}")
    actual = path.stat().st_size
    if size is not None and actual != size:
        state = "truncated" if actual < size else "larger than expected"
        raise ModelFileError(f"model file {path} is {state} ({actual} of {size} bytes); {fix}")
    if deep and sha256 is not None and sha256_file(path) != sha256:
        raise ModelFileError(f"model file {path} has the wrong sha256 (corrupt download); {fix}")


def check_safetensors(path: Path, fix: str) -> None:
    """Raise ModelFileError unless the file's size matches what its own header declares."""
    if not path.is_file():
        raise ModelFileError(f"weight file {path} is missing; {fix}")
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size:
                raise ValueError("header longer than file")
            header = json.loads(fh.read(header_len))
    except (struct.error, ValueError) as exc:
        raise ModelFileError(f"weight file {path} is corrupt ({exc}); {fix}") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    expected = 8 + header_len + end
    if size < expected:
        raise ModelFileError(f"weight file {path} is truncated ({size} of {expected} bytes); {fix}")


def check_checkpoint(folder: Path, fix: str) -> None:
    """Raise ModelFileError unless a checkpoint folder has its config, tokenizer and every weight shard."""
    if not (folder / "config.json").is_file():
        raise ModelFileError(f"{folder} has no config.json, so it is not a model checkpoint; {fix}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ModelFileError(f"{folder} has no model.safetensors or model.safetensors.index.json; {fix}")
    for shard in shards:
        if not (folder / shard).is_file():
            raise ModelFileError(f"shard {shard} of {folder} is missing ({len(shards)} shards expected); {fix}")
        check_safetensors(folder / shard, fix)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ModelFileError(f"{folder} has no tokenizer.json or tokenizer.model; {fix}")
