"""Text in and out of `moe serve`: byte-level models (vocab 256, our own checkpoints) read and
write UTF-8 bytes; Hugging Face checkpoints use their tokenizer.json. (Incremental text and stop
strings are core.generation.DecodeBatch's: it calls `decode` on a sequence's tokens.)
"""
from __future__ import annotations

from typing import Any


class TokenizerAdapter:
    """encode(text) -> ids, decode(ids) -> text, for a `tokenizers.Tokenizer` or bytes (vocab 256)."""

    def __init__(self, vocab_size: int, tokenizer: Any = None):
        if tokenizer is None and vocab_size != 256:
            raise ValueError(f"this model has vocab_size={vocab_size} and no tokenizer.json; `moe serve` needs "
                             f"text in and out: serve a checkpoint directory that ships tokenizer.json")
        self.vocab_size, self.tokenizer = vocab_size, tokenizer

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return bytes(ids).decode("utf-8", errors="replace")
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")


__all__ = ["TokenizerAdapter"]
