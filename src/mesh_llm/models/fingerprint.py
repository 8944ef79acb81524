"""Tokenizer fingerprints: equal fingerprints mean interchangeable token ids, text and chat prompts.

The fingerprint covers everything that decides which ids a text becomes and which text ids become:
the model (vocabulary, merges and their options), the normalizer, pre-tokenizer, post-processor and
decoder, every added token with its matching options, the special tokens with their ids, the flags
that add BOS/EOS or clean up spaces, and the chat template. Runtime settings that do not change
ids of the texts the router sends (padding, truncation, the maximum length) and file-format details
(the serialisation version, the Python class name) are left out, so the same tokenizer saved by a
fine-tune, a quantisation variant or another transformers release keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import json

# tokenizer_config.json flags that change the ids or the decoded text of the same input
_BEHAVIOUR_FLAGS = ("add_bos_token", "add_eos_token", "add_prefix_space", "clean_up_tokenization_spaces",
                    "do_lower_case", "legacy", "split_special_tokens", "spaces_between_special_tokens")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the whole tokenizer: model, normalizer, pre/post-processing, decoder, special tokens, chat template."""
    return hashlib.sha256(_canonical(tokenizer_description(tokenizer)).encode()).hexdigest()


def tokenizer_description(tokenizer) -> dict:
    """The JSON-able facts the fingerprint hashes (useful to see why two fingerprints differ)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        model = dict(state.get("model") or {})
        if model.get("merges") is not None:
            model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        pipeline = {key: state.get(key) for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder")}
        added = sorted(state.get("added_tokens") or [], key=lambda a: a["id"])
    else:  # a slow (Python) tokenizer: its vocabulary and added tokens are what can be compared
        model = {"vocab": tokenizer.get_vocab()}
        pipeline = {}
        added = sorted(({"id": int(i), "content": str(t), "special": bool(getattr(t, "special", False))}
                        for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()), key=lambda a: a["id"])
    special = []
    for name, value in sorted(tokenizer.special_tokens_map.items()):
        for token in value if isinstance(value, list) else [value]:
            special.append([name, str(token), int(tokenizer.convert_tokens_to_ids(str(token)))])
    flags = {name: tokenizer.init_kwargs[name] for name in _BEHAVIOUR_FLAGS
             if isinstance(tokenizer.init_kwargs.get(name), (bool, int, str))}
    return {"model": model, **pipeline, "added_tokens": added, "special_tokens": special, "flags": flags,
            "chat_template": getattr(tokenizer, "chat_template", None)}


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
