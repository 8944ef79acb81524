"""Tokenizers per tokenizer family, fetched once from an expert and checked against its fingerprint."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path

from mesh_llm.errors import MeshError
from mesh_llm.models.fingerprint import tokenizer_fingerprint
from mesh_llm.paths import mesh_home
from mesh_llm.pb import expert_pb2
from mesh_llm.router.constrain import LLTokenizers

log = logging.getLogger(__name__)


class TokenizerMismatch(MeshError):
    """An expert's tokenizer files do not hash to the fingerprint it registered with."""


class TokenizerCache:
    """Tokenizers by fingerprint: in memory, then MESH_HOME/tokenizers, then fetched from an expert."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or mesh_home() / "tokenizers"
        self._loaded: dict[str, object] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.grammar = LLTokenizers()  # grammar-engine tokenizers of the same families

    async def get(self, fingerprint: str, stub) -> object:
        """The tokenizer of a family, fetching its files through stub.GetTokenizer when not cached."""
        if fingerprint in self._loaded:
            return self._loaded[fingerprint]
        async with self._locks.setdefault(fingerprint, asyncio.Lock()):
            if fingerprint not in self._loaded:
                folder = self.root / fingerprint
                if not folder.is_dir():
                    await self._fetch(stub, folder)
                self._loaded[fingerprint] = await asyncio.to_thread(self._load_checked, folder, fingerprint)
        return self._loaded[fingerprint]

    async def _fetch(self, stub, folder: Path) -> None:
        files: dict[str, bytearray] = {}
        async for chunk in stub.GetTokenizer(expert_pb2.TokenizerRequest(), timeout=60):
            name = Path(chunk.name).name  # never write outside the folder
            buf = files.setdefault(name, bytearray())
            if chunk.offset != len(buf):
                raise MeshError(f"tokenizer file {name} arrived out of order")
            buf.extend(chunk.data)
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name, data in files.items():
            (staging / name).write_bytes(bytes(data))
        staging.replace(folder)

    @staticmethod
    def _load_checked(folder: Path, fingerprint: str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        actual = tokenizer_fingerprint(tokenizer)
        if actual != fingerprint:
            shutil.rmtree(folder, ignore_errors=True)
            raise TokenizerMismatch(f"tokenizer files hash to {actual[:12]}, not the registered {fingerprint[:12]}")
        return tokenizer
