"""Incremental detokenisation gives the text a whole decode gives, one token at a time."""

from __future__ import annotations

import numpy as np
import pytest

from mesh_llm.router.detokenize import REPLACEMENT, IncrementalText

TEXTS = ["Hello, world! The quick brown fox.", "naïve café — déjà vu 日本語のテキスト 🙂🚀 ok",
         "def f(x):\n    return x  # done\n\n", "  leading spaces and\ttabs\n"]


def _whole(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", TEXTS)
def test_growing_text_matches_a_whole_decode_at_every_complete_step(tiny_loaded, text):
    tokenizer = tiny_loaded.tokenizer
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > 3
    inc = IncrementalText(tokenizer)
    for n in range(1, len(ids) + 1):
        grown = inc.update(ids[:n])
        whole = _whole(tokenizer, ids[:n])
        if not whole.endswith(REPLACEMENT):
            assert grown == whole
        else:
            assert whole.startswith(grown) and REPLACEMENT not in grown  # half a character is held back
    assert inc.text == _whole(tokenizer, ids)


def test_random_tokens_and_a_restart_after_rollback(tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(0, tiny_loaded.vocab_size, size=120)]
    inc = IncrementalText(tokenizer)
    for n in range(1, len(ids) + 1):
        grown = inc.update(ids[:n])
        whole = _whole(tokenizer, ids[:n])
        if not whole.endswith(REPLACEMENT):
            assert grown == whole
    words = tokenizer(" after the rollback", add_special_tokens=False).input_ids
    other = ids[:10] + words  # not an extension of what it saw: decoding starts over
    assert inc.update(other) == _whole(tokenizer, other)


def test_decodes_only_a_window_per_token(tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    ids = tokenizer(" word" * 400, add_special_tokens=False).input_ids
    decoded: list[int] = []

    class Counting:
        def decode(self, tokens, **kw):
            decoded.append(len(tokens))
            return tokenizer.decode(tokens, **kw)

    inc = IncrementalText(Counting())
    for n in range(1, len(ids) + 1):
        inc.update(ids[:n])
    assert inc.text == _whole(tokenizer, ids)
    assert max(decoded) <= 4  # a whole decode each token would reach len(ids)
