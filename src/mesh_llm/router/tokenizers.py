"""Tokenizers per tokenizer family, fetched from experts and checked against their fingerprint.

Every registering expert's tokenizer files are fetched and checked (`verify`): they must hash to the
fingerprint its Info claims. Files byte-identical to ones already checked (the family's cached files,
or another expert's) are accepted without loading them again; anything else is loaded and
fingerprinted whole, so an expert whose files differ in anything that changes ids, text or chat
prompts is another family and never mixed with this one. The first family checked becomes the
router's default family unless the operator pinned one.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

from mesh_llm.errors import MeshError
from mesh_llm.mixing.constrain import LLTokenizers
from mesh_llm.models.fingerprint import tokenizer_fingerprint
from mesh_llm.paths import mesh_home
from mesh_llm.pb import expert_pb2

log = logging.getLogger(__name__)
MAX_TOKENIZER_BYTES = 64 << 20  # a tokenizer larger than this (all files together) is refused
MAX_TOKENIZER_FILES = 32  # so is one with more files
CONCURRENT_CHECKS = 8  # registrations fetching tokenizer files at the same time


class TokenizerMismatch(MeshError):
    """An expert's tokenizer files do not hash to the fingerprint it registered with."""


class TokenizerCache:
    """Tokenizers by fingerprint: in memory, then MESH_HOME/tokenizers, then fetched from an expert."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or mesh_home() / "tokenizers"
        self._loaded: dict[str, object] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._checked: dict[str, str] = {}  # sha256 of a set of files -> the fingerprint they were found to hash to
        self._checks: dict[str, asyncio.Future] = {}  # checks under way, by files digest (shared by retries)
        self._fetching: asyncio.Semaphore | None = None
        self.first_family: str | None = None  # fingerprint of the first tokenizer checked (the default family)
        self.grammar = LLTokenizers()  # grammar-engine tokenizers of the same families

    async def get(self, fingerprint: str, stub) -> object:
        """The tokenizer of a family, fetching its files through stub.GetTokenizer when not cached."""
        if fingerprint in self._loaded:
            return self._loaded[fingerprint]
        async with self._locks.setdefault(fingerprint, asyncio.Lock()):
            if fingerprint not in self._loaded:
                folder = self.root / fingerprint
                if folder.is_dir():
                    self._loaded[fingerprint] = await asyncio.to_thread(self._load_checked, folder, fingerprint)
                else:  # fetched, checked, and only then cached on disk
                    files = await fetch_files(stub)
                    actual, tokenizer = await asyncio.to_thread(_fingerprint_files, files)
                    self._checked[files_digest(files)] = actual
                    if actual != fingerprint:
                        raise TokenizerMismatch(f"tokenizer files hash to {actual[:12]}, not the registered "
                                                f"{fingerprint[:12]}")
                    _write_folder(folder, files)
                    self._loaded[fingerprint] = tokenizer
        return self._loaded[fingerprint]

    async def verify(self, stub, claimed: str, timeout_s: float = 60.0) -> None:
        """Fetch an expert's tokenizer files and check they hash to claimed; TokenizerMismatch if they do not."""
        if self._fetching is None:
            self._fetching = asyncio.Semaphore(CONCURRENT_CHECKS)
        async with self._fetching:
            files = await fetch_files(stub, timeout_s)
        digest = files_digest(files)
        actual = self._checked.get(digest)
        if actual is None:
            check = self._checks.get(digest)
            if check is None:  # one check per distinct set of files; a retried registration waits for it
                check = self._checks[digest] = asyncio.ensure_future(self._check(files, digest, claimed))
                check.add_done_callback(lambda _, d=digest: self._checks.pop(d, None))
            actual = await asyncio.shield(check)
        if actual != claimed:
            raise TokenizerMismatch(f"the expert's tokenizer files hash to {actual[:12]}, not the fingerprint "
                                    f"{claimed[:12]} its Info claims; serve the model's own tokenizer files "
                                    f"(restart the expert so it fingerprints the files it serves)")
        if self.first_family is None:
            self.first_family = claimed
            log.info("default tokenizer family %s (the first one checked)", claimed[:12])

    async def _check(self, files: dict[str, bytes], digest: str, claimed: str) -> str:
        """The fingerprint files hash to (compared byte for byte with the family's cached files first)."""
        folder = self.root / claimed
        if folder.is_dir() and files_digest(_read_folder(folder)) == digest:
            actual = claimed  # the family's cached files, checked when they were written
        else:
            actual, tokenizer = await asyncio.to_thread(_fingerprint_files, files)
            if actual == claimed and not folder.is_dir():
                _write_folder(folder, files)
                self._loaded.setdefault(claimed, tokenizer)
        self._checked[digest] = actual
        return actual

    @staticmethod
    def _load_checked(folder: Path, fingerprint: str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        actual = tokenizer_fingerprint(tokenizer)
        if actual != fingerprint:
            shutil.rmtree(folder, ignore_errors=True)
            raise TokenizerMismatch(f"tokenizer files hash to {actual[:12]}, not the registered {fingerprint[:12]}")
        return tokenizer


async def fetch_files(stub, timeout_s: float = 60.0) -> dict[str, bytes]:
    """An expert's tokenizer files by name, streamed through GetTokenizer (bounded in count and size)."""
    files: dict[str, bytearray] = {}
    total = 0
    async for chunk in stub.GetTokenizer(expert_pb2.TokenizerRequest(), timeout=timeout_s):
        name = Path(chunk.name).name  # never write outside the folder
        if not name or name in (".", ".."):
            raise MeshError(f"tokenizer file with an unusable name {chunk.name!r}")
        buf = files.setdefault(name, bytearray())
        if chunk.offset != len(buf):
            raise MeshError(f"tokenizer file {name} arrived out of order")
        total += len(chunk.data)
        if total > MAX_TOKENIZER_BYTES or len(files) > MAX_TOKENIZER_FILES:
            raise MeshError(f"the expert's tokenizer is over {MAX_TOKENIZER_BYTES >> 20} MiB or "
                            f"{MAX_TOKENIZER_FILES} files; that is not a tokenizer")
        buf.extend(chunk.data)
    if not files:
        raise MeshError("the expert sent no tokenizer files")
    return {name: bytes(data) for name, data in files.items()}


def files_digest(files: dict[str, bytes]) -> str:
    """sha256 over file names and contents, in name order."""
    h = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _fingerprint_files(files: dict[str, bytes]) -> tuple[str, object]:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp)
        except Exception as exc:  # whatever the files are, they are not a tokenizer this router can use
            raise TokenizerMismatch(f"the expert's tokenizer files do not load ({type(exc).__name__}: {exc})") \
                from None
        return tokenizer_fingerprint(tokenizer), tokenizer


def _read_folder(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Write files into folder through a staging folder and one rename."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    try:
        staging.replace(folder)
    except OSError:  # another process or task put the folder there first
        shutil.rmtree(staging, ignore_errors=True)
