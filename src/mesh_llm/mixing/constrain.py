"""Grammar-constrained sampling: a JSON schema decides which tokens the router may pick next."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import numpy as np

from mesh_llm.errors import MeshError
from mesh_llm.wire import SparseDist

log = logging.getLogger(__name__)


class BadSchema(MeshError):
    """A JSON schema the grammar engine cannot compile."""


class LLTokenizers:
    """llguidance tokenizers per tokenizer fingerprint (building one scans the vocabulary once)."""

    def __init__(self) -> None:
        self._cache: dict[str, object] = {}

    def get(self, fingerprint: str, hf_tokenizer: Any) -> object:
        """The llguidance tokenizer for a family, built on first use."""
        if fingerprint not in self._cache:
            import llguidance.hf

            self._cache[fingerprint] = llguidance.hf.from_tokenizer(hf_tokenizer)
        return self._cache[fingerprint]


class SchemaConstraint:
    """Tracks a JSON-schema grammar over the generated tokens and masks the mixed distribution."""

    def __init__(self, ll_tokenizer: Any, schema_text: str, vocab_size: int) -> None:
        import llguidance

        try:
            schema = json.loads(schema_text)
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as exc:
            raise BadSchema(f"json_schema is not a usable JSON schema: {exc}") from None
        self.matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        if self.matcher.is_error():
            raise BadSchema(f"json_schema cannot be compiled: {self.matcher.get_error()}")
        self.vocab_size = vocab_size

    @property
    def finished(self) -> bool:
        """Whether the output is complete under the grammar."""
        return self.matcher.is_stopped()

    def allowed_ids(self) -> np.ndarray:
        """Token ids the grammar allows next."""
        bits = np.unpackbits(np.frombuffer(bytes(self.matcher.compute_bitmask()), dtype=np.uint8),
                             bitorder="little")
        return np.flatnonzero(bits[: self.vocab_size])

    def restrict(self, dist: SparseDist) -> SparseDist:
        """dist limited to allowed tokens: listed ones keep their mass, unlisted ones share the rest mass evenly."""
        allowed = self.allowed_ids()
        if len(allowed) == 0:
            raise MeshError(f"the grammar allows no token here ({self.matcher.get_error() or 'dead end'})")
        spread = dist.spread_logprob(self.vocab_size)
        where = np.searchsorted(dist.ids, allowed)
        where = np.minimum(where, len(dist.ids) - 1)
        listed = dist.ids[where] == allowed
        logprobs = np.where(listed, dist.logprobs[where], spread)
        if not np.any(np.isfinite(logprobs)):
            logprobs = np.zeros(len(allowed))  # nothing listed and no rest mass: uniform over allowed
        return SparseDist(ids=allowed, logprobs=logprobs, rest_logmass=-math.inf)

    def consume(self, token_id: int) -> None:
        """Advance the grammar by the sampled token."""
        if not self.matcher.consume_token(int(token_id)):
            raise MeshError(f"grammar refused token {token_id}: {self.matcher.get_error()}")
