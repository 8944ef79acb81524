"""Drafters for multi-token rounds: cheap guesses of the next tokens that the experts verify in one round trip.

Two kinds: `ngram` (prompt lookup: the tokens that followed the latest earlier occurrence of the
context's last n-gram; no model, strong on code and repeated text) and `model:NAME` (a small
catalog model run in the router process with its own KV cache). `none` turns drafting off.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np

from mesh_llm.errors import MeshError
from mesh_llm.mixing.sampling import SamplingConfig, sampling_probs

log = logging.getLogger(__name__)
DRAFT_KINDS = ("none", "ngram", "model:NAME")
MAX_GAMMA = 16  # the most tokens one round may draft


class UnknownDrafter(MeshError, ValueError):
    """A drafter name that is neither none, ngram nor model:NAME."""


class DraftMismatch(MeshError):
    """A draft model whose tokenizer differs from the experts' family."""


@dataclass(frozen=True, kw_only=True)
class DraftSpec:
    kind: str  # none, ngram or model
    model: str = ""  # catalog name or checkpoint path when kind is model


@dataclass(frozen=True, kw_only=True)
class Draft:
    tokens: list[int]  # proposed continuation, possibly empty
    probs: list[np.ndarray | None]  # per token the drafter's full-vocabulary distribution (None: deterministic)
    seconds: float = 0.0  # time spent drafting


def parse_draft(spec: str) -> DraftSpec:
    """The drafter named by spec (none, ngram, model:NAME); UnknownDrafter naming the choices otherwise."""
    text = (spec or "none").strip()
    if text in ("none", "ngram"):
        return DraftSpec(kind=text)
    if text.startswith("model:") and text[len("model:"):].strip():
        return DraftSpec(kind="model", model=text[len("model:"):].strip())
    raise UnknownDrafter(f"unknown drafter {spec!r}; use one of {', '.join(DRAFT_KINDS)} "
                         "(NAME from `mesh models list`)")


def check_gamma(gamma: int) -> int:
    """gamma if it is a usable draft length; ValueError naming the range otherwise."""
    if not 1 <= gamma <= MAX_GAMMA:
        raise ValueError(f"draft length (gamma) {gamma} is out of range; use 1..{MAX_GAMMA}")
    return gamma


class NgramDrafter:
    """Prompt lookup: continue the context's last n-gram (longest n first) as it continued last time."""

    def __init__(self, max_n: int = 3) -> None:
        self.max_n = max_n
        self._tokens: list[int] = []
        self._latest: dict[tuple[int, ...], int] = {}  # n-gram -> start of its latest continuation

    def _index(self, context: list[int]) -> None:
        if context[: len(self._tokens)] != self._tokens:
            self._tokens, self._latest = [], {}
        start = len(self._tokens)
        self._tokens = list(context)
        for e in range(max(start - 1, 0), len(context) - 1):
            for n in range(1, self.max_n + 1):
                if e - n + 1 >= 0:
                    self._latest[tuple(context[e - n + 1: e + 1])] = e + 1

    def propose(self, context: list[int], gamma: int) -> Draft:
        """Up to gamma tokens that followed the latest earlier occurrence of the context's suffix."""
        began = time.perf_counter()
        self._index(context)
        for n in range(min(self.max_n, len(context) - 1), 0, -1):
            follow = self._latest.get(tuple(context[-n:]))
            if follow is not None:
                tokens = context[follow: follow + gamma]
                return Draft(tokens=tokens, probs=[None] * len(tokens), seconds=time.perf_counter() - began)
        return Draft(tokens=[], probs=[], seconds=time.perf_counter() - began)


class DraftModel:
    """A model loaded in the router for drafting; generations share it, one forward pass at a time."""

    def __init__(self, loaded) -> None:
        self.loaded = loaded
        self.lock = threading.Lock()


class ModelDrafter:
    """Drafts with a DraftModel under the generation's sampling config, keeping its own KV cache."""

    def __init__(self, model: DraftModel, sampling: SamplingConfig, seed: int | None = None) -> None:
        from transformers import DynamicCache

        self.model = model
        self.sampling = sampling
        self.rng = np.random.default_rng(seed)
        self.cache = DynamicCache(config=model.loaded.model.config)
        self.fed: list[int] = []  # tokens whose keys and values the cache holds

    def propose(self, context: list[int], gamma: int) -> Draft:
        """gamma tokens sampled (or argmax) from the draft model after context; blocking, run it in a thread."""
        began = time.perf_counter()
        with self.model.lock:
            logits = self._sync(context)
            tokens: list[int] = []
            probs: list[np.ndarray | None] = []
            for i in range(gamma):
                token, q = self._choose(logits)
                tokens.append(token)
                probs.append(q)
                if i + 1 < gamma:
                    logits = self._feed([token])
        return Draft(tokens=tokens, probs=probs, seconds=time.perf_counter() - began)

    def warm(self, context: list[int]) -> None:
        """Fill the draft model's cache with context (the prompt) while the experts prefill theirs."""
        with self.model.lock:
            self._sync(context)

    def _sync(self, context: list[int]):
        common = 0
        limit = min(len(self.fed), len(context) - 1)  # re-feed at least the last token to get its logits
        while common < limit and self.fed[common] == context[common]:
            common += 1
        if common < len(self.fed):
            if common == 0:
                self.cache.reset()
            else:
                self.cache.crop(common - len(self.fed))  # a negative count drops that many trailing positions
            del self.fed[common:]
        return self._feed(context[common:])

    def _feed(self, tokens: list[int]):
        import torch

        loaded = self.model.loaded
        with torch.inference_mode():
            ids = torch.tensor([tokens], dtype=torch.long, device=loaded.device)
            out = loaded.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.fed.extend(tokens)
        return out.logits[0, -1].float()

    def _choose(self, logits) -> tuple[int, np.ndarray | None]:
        import torch

        if self.sampling.temperature == 0:
            return int(torch.argmax(logits)), None
        logprobs = torch.log_softmax(logits, dim=-1).double().cpu().numpy()
        pool, weights = sampling_probs(logprobs, self.sampling)
        q = np.zeros(len(logprobs))
        q[pool] = weights / weights.sum()
        cumulative = np.cumsum(q[pool])
        pick = min(int(np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right")), len(pool) - 1)
        return int(pool[pick]), q


class DraftModels:
    """Draft models by name, loaded on first use (in a thread) and kept for every later generation."""

    def __init__(self) -> None:
        self._models: dict[str, DraftModel] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, name: str, fingerprint: str) -> DraftModel:
        """The loaded draft model `name`; DraftMismatch if its tokenizer is not the experts' family."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name not in self._models:
                self._models[name] = DraftModel(await asyncio.to_thread(_load_cpu, name))
        model = self._models[name]
        if model.loaded.fingerprint != fingerprint:
            raise DraftMismatch(f"draft model {name!r} has tokenizer fingerprint {model.loaded.fingerprint[:12]} "
                                f"but the experts' family is {fingerprint[:12]}; pick a draft model of the same "
                                "family (`mesh status` shows the experts' models) or use --draft ngram")
        return model


def _load_cpu(name: str):
    from mesh_llm.models.loading import LoadOptions, load

    log.info("loading draft model %s", name)
    return load(LoadOptions(model=name, device="cpu"))
