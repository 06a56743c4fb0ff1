"""Streaming token ids -> text that never splits a UTF-8 character."""

from __future__ import annotations

import codecs

from k2ray.api.tokenizer import K2Tokenizer


class IncrementalDetokenizer:
    """Turns a growing token stream into text deltas.

    Byte-level BPE tokens can end inside a multi-byte character; those bytes are held back until the
    character completes, so `push` never returns half a character. The concatenated deltas plus `flush()`
    equal `tokenizer.decode(all_ids, skip_special_tokens)`: bytes that can never complete become U+FFFD,
    special tokens are kept as their text unless `skip_special_tokens`.
    """

    def __init__(self, tokenizer: K2Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: list[int]) -> str:
        self.token_ids.extend(token_ids)
        pieces = []
        for token_id in token_ids:
            # Skipped specials leave pending bytes pending, as tokenizer.decode drops them before decoding.
            if self.skip_special_tokens and self.tokenizer.is_special(token_id):
                continue
            pieces.append(self._decoder.decode(self.tokenizer.token_bytes(token_id)))
        delta = "".join(pieces)
        self.text += delta
        return delta

    def flush(self) -> str:
        delta = self._decoder.decode(b"", final=True)
        self.text += delta
        return delta
