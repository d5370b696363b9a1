"""Text in and out of `moe serve`: the model's tokenizer, incremental detokenization, stop strings.

Byte-level models (vocab 256, our own checkpoints) read and write UTF-8 bytes; Hugging Face
checkpoints use their tokenizer.json. Streamed text must equal the text of the whole answer, so
TextStream decodes incrementally and holds back (a) bytes of an unfinished UTF-8 character and
(b) any tail that could still grow into a stop string; a stop string ends the answer and is not
part of it (the OpenAI rule).
"""
from __future__ import annotations

import codecs
from typing import Any


class TokenizerAdapter:
    """encode(text) -> ids, decode(ids) -> text, for a `tokenizers.Tokenizer` or bytes (vocab 256)."""

    def __init__(self, vocab_size: int, tokenizer: Any = None):
        if tokenizer is None and vocab_size != 256:
            raise ValueError(f"this model has vocab_size={vocab_size} and no tokenizer.json; `moe serve` needs "
                             f"text in and out: serve a checkpoint directory that ships tokenizer.json")
        self.vocab_size, self.tokenizer = vocab_size, tokenizer

    @property
    def byte_level(self) -> bool:
        return self.tokenizer is None

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


class _Detokenizer:
    """Text of the ids so far, one id at a time, never splitting a character."""

    def __init__(self, tok: TokenizerAdapter):
        self.tok, self.ids, self.text = tok, [], ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if tok.byte_level else None

    def push(self, token: int) -> None:
        if self._utf8 is not None:
            self.text += self._utf8.decode(bytes([token]))
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        # A trailing U+FFFD is usually half of a multi-token character: wait for the rest.
        if not text.endswith("\ufffd") and text.startswith(self.text):
            self.text = text

    def flush(self) -> None:
        if self._utf8 is not None:
            self.text += self._utf8.decode(b"", final=True)
        elif self.ids:
            self.text = self.tok.decode(self.ids)


class TextStream:
    """Tokens in, text deltas out; says when a stop string ends the answer."""

    def __init__(self, tok: TokenizerAdapter, stops: list[str]):
        self._d, self.stops = _Detokenizer(tok), stops
        self.sent = 0          # characters of the answer already handed out
        self.stopped = False   # a stop string was seen; the answer is final

    @property
    def text(self) -> str:
        """The answer so far (up to a stop string, when one was seen)."""
        return self._d.text if not self.stopped else self._final

    def push(self, token: int) -> str:
        """Add one generated token; return the text that is now safe to send (maybe '')."""
        self._d.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The answer ended (EOS, length, stop token): flush what was held back."""
        self._d.flush()
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        text = self._d.text
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.stopped, self._final = True, text[:cut]
            out, self.sent = text[self.sent:cut], cut
            return out
        end = len(text) if final else len(text) - self._held(text)
        out = text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


__all__ = ["TokenizerAdapter", "TextStream"]
