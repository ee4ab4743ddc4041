"""Incremental detokenization: the text piece each new token adds to a stream, in O(1) per token.

Decoding the whole output again for every token (the simple way) costs O(n) per token, O(n^2) per
request: for a 4K-token answer that is 4K decodes of up to 4K tokens, on the engine's one worker
thread. Here each token decodes a short window of the ids instead: the tokens since the last
"clean" point before the previous one (a point where the text decoded so far ends in a complete
character), plus the new token:

    text  = decode(ids[prefix:])                 # context + tokens not yet cleanly read
    piece = text[emitted:]                        # minus what was already emitted from it

The context tokens make decoders that are not plain concatenation come out right: a decoder that
joins tokens with spaces (WordLevel), or strips the leading space of the first token
(SentencePiece's metaspace), sees the new token in the middle of a sequence, as in the full decode.
A text that ends in U+FFFD may end in an incomplete UTF-8 sequence (byte-level tokenizers split
multi-byte characters over tokens): those trailing characters wait for the next token; the
complete characters before them are emitted at once. A window longer than `max_window` tokens
that still ends in U+FFFD (a model producing invalid bytes) is emitted as it is, so the window
stays bounded. Tokens that decode to nothing (special tokens, skipped) never become the context
alone: the earlier context is kept, and the window spans them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    """The text of a growing token sequence, piece by piece (module docstring). `push(token)` returns
    the text the token completes (possibly ""); `flush()` returns what is still held back."""

    def __init__(self, tokenizer: _Decoder, max_window: int = 16):
        self.tokenizer = tokenizer
        self.max_window = max_window
        self.ids: list[int] = []
        self._prefix = 0  # first id of the decode window
        self._read = 0  # the last clean point: decode(ids[:read]) ended in a complete character
        self._emitted = 0  # characters of decode(ids[prefix:]) already emitted

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids[self._prefix:])
        clean = not text.endswith(REPLACEMENT) or len(self.ids) - self._prefix > self.max_window
        stable = text if clean else text.rstrip(REPLACEMENT)
        piece = stable[self._emitted:]
        self._emitted = max(self._emitted, len(stable))
        if clean:
            self._move_window()
        return piece

    def flush(self) -> str:
        """Whatever is held back (an incomplete character at the end), emitted now."""
        piece = self.tokenizer.decode(self.ids[self._prefix:])[self._emitted:]
        if self.ids:
            self._move_window()
        return piece

    def _move_window(self) -> None:
        """At a clean point: the tokens since the previous clean point become the context."""
        context = self.ids[self._read:]
        text = self.tokenizer.decode(context)
        if text:  # a context of tokens that decode to nothing would lose the separators
            self._prefix, self._emitted = self._read, len(text)
        else:
            self._emitted = len(self.tokenizer.decode(self.ids[self._prefix:]))
        self._read = len(self.ids)
