"""Incremental detokenisation: a completion's text grown token by token without re-decoding it whole.

Decoding the whole completion after every token costs time quadratic in its length. Instead the
text is decoded over a short window: the tokens since the last point where the text was complete
(`prefix`), compared with the same window without the newest tokens (`read`). A token that ends in
half a multi-byte character adds nothing until the character completes, and a tokenizer that
drops a leading space when a piece is decoded alone still decodes it in context.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


class IncrementalText:
    """The decoded text of a growing token list, each new token decoded over a short window."""

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.text = ""  # complete characters only
        self.prefix = 0  # window start: the text of tokens[:prefix] is settled
        self.read = 0  # tokens[:read] are in self.text

    def update(self, tokens: Sequence[int]) -> str:
        """The text of tokens, which extend the tokens of the last call (otherwise decoding starts over)."""
        if list(tokens[: len(self.tokens)]) != self.tokens:
            self.__init__(self.tokenizer, skip_special_tokens=self.skip_special_tokens)
        for token in tokens[len(self.tokens):]:
            self._add(int(token))
        return self.text

    def _add(self, token: int) -> None:
        self.tokens.append(token)
        before = self._decode(self.tokens[self.prefix: self.read])
        after = self._decode(self.tokens[self.prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.tokens)

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens) if tokens else ""
