"""Tokenizer fingerprints: equal fingerprints mean interchangeable token ids."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary, the merges and the special tokens with their ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        model = state.get("model", {})
        vocab = model.get("vocab")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        added = sorted((a["id"], a["content"], bool(a.get("special"))) for a in state.get("added_tokens", []))
    else:
        vocab, merges, added = tokenizer.get_vocab(), [], []
    special = sorted((str(t), int(tokenizer.convert_tokens_to_ids(t))) for t in tokenizer.all_special_tokens)
    canonical = json.dumps({"vocab": vocab, "merges": merges, "added": added, "special": special},
                           sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
