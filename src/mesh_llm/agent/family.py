"""Facts of a tokenizer family the agent needs: its tokenizer, context limit and vocabulary (from an expert)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mesh_llm.errors import MeshError
from mesh_llm.grpc_util import channel
from mesh_llm.pb import expert_pb2, expert_pb2_grpc
from mesh_llm.router.tokenizers import TokenizerCache

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Family:
    fingerprint: str  # tokenizer fingerprint
    tokenizer: object  # transformers tokenizer of the family
    context_limit: int  # context limit of the expert that answered
    vocab_size: int  # rows of the output distribution
    max_top_k: int  # largest top_k the experts serve

    def count(self, prompt: str, chat: bool = True) -> int:
        """Tokens the router will feed for this prompt (same chat-template rule as the router)."""
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            return len(tok(text, add_special_tokens=False).input_ids)
        return len(tok(prompt).input_ids)


class Families:
    """Family facts by fingerprint, fetched once from one of its experts (Info and GetTokenizer)."""

    def __init__(self, tokenizers: TokenizerCache | None = None) -> None:
        """Cache tokenizers in tokenizers (default: MESH_HOME/tokenizers)."""
        self.tokenizers = tokenizers or TokenizerCache()
        self._known: dict[str, Family] = {}

    async def get(self, fingerprint: str, addresses: list[str]) -> Family:
        """The family of fingerprint, asking the experts at addresses until one answers."""
        if fingerprint in self._known:
            return self._known[fingerprint]
        errors = []
        for address in addresses:
            try:
                async with channel(address) as ch:
                    stub = expert_pb2_grpc.ExpertStub(ch)
                    info = await stub.Info(expert_pb2.InfoRequest(), timeout=10)
                    tokenizer = await self.tokenizers.get(fingerprint, stub)
            except Exception as exc:  # an unreachable expert: try the next one
                errors.append(f"{address}: {exc}")
                continue
            family = Family(fingerprint=fingerprint, tokenizer=tokenizer, context_limit=info.context_limit,
                            vocab_size=info.vocab_size, max_top_k=info.max_top_k)
            self._known[fingerprint] = family
            return family
        raise MeshError(f"no expert of tokenizer family {fingerprint[:12]} answered Info: {'; '.join(errors)}")
