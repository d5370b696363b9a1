"""A byte-level BPE vocabulary for models trained here (Hugging Face `tokenizers`).

The default corpus and quick start are byte-level (vocab 256, no tokenizer). `train_bpe` builds a
byte-level BPE (GPT-2 style: any UTF-8 text round-trips exactly, no unknown token) from texts;
`moe train --tokenizer PATH` trains on text encoded with a saved one, copies it into the run
directory as tokenizer.json and records its sha256 in the run config, and `moe generate` /
`moe serve` pick it up from the checkpoint's run directory (the same file a Hugging Face checkpoint
ships, read by the same core.hf.load_tokenizer).

Id 0 is DOC_SEP, the document separator (the byte-level corpora join documents with byte 0 too).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

DOC_SEP = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
"""The file name inside a run directory (and a Hugging Face checkpoint directory)."""
MIN_VOCAB, MAX_VOCAB = 257 + 1, 1 << 20


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, with what to do about it."""


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError("a BPE vocabulary needs the `tokenizers` package: pip install 'moe-runtime[hf]'") from None
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` with vocab_size tokens (DOC_SEP, the 256 byte
    symbols, then merges) trained on texts. Deterministic for the same texts in the same order."""
    tk = _tokenizers()
    if not MIN_VOCAB <= vocab_size <= MAX_VOCAB:
        raise TokenizerError(f"vocab_size={vocab_size} must be in [{MIN_VOCAB}, {MAX_VOCAB}] "
                             f"(the separator, 256 byte symbols and at least one merge)")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                     special_tokens=[DOC_SEP],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def doc_separator_id(tokenizer: Any) -> int:
    """The id of DOC_SEP in tokenizer; an error naming the fix when it has none."""
    i = tokenizer.token_to_id(DOC_SEP)
    if i is None:
        raise TokenizerError(f"the tokenizer has no {DOC_SEP!r} token to separate documents; "
                             f"train it with core.tokenizer.train_bpe")
    return int(i)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tokenizer(tokenizer: Any, path: str | Path) -> str:
    """Write tokenizer as JSON to path (a file, or a directory that gets tokenizer.json); its sha256."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return file_sha256(path)


def load_tokenizer_file(path: str | Path, expect_sha256: str | None = None) -> tuple[Any, str]:
    """(tokenizers.Tokenizer, sha256) from a tokenizer.json (or a directory holding one).

    expect_sha256: the digest a run recorded; a different file is an error (the ids would not match
    the model's embedding rows)."""
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILE
    if not p.is_file():
        raise TokenizerError(f"--tokenizer {path}: no such file; pass a tokenizer.json (e.g. one written by "
                             f"bench/balance_study.py --tokens, or core.tokenizer.save_tokenizer)")
    tk = _tokenizers()
    digest = file_sha256(p)
    if expect_sha256 is not None and digest != expect_sha256:
        raise TokenizerError(f"{p} has sha256 {digest[:12]}..., but the run was trained with {expect_sha256[:12]}...; "
                             f"use the tokenizer.json saved in the run directory")
    try:
        tok = tk.Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"{p}: not a valid tokenizers file ({str(e).splitlines()[0] if str(e) else e!r})") from None
    return tok, digest


__all__ = ["DOC_SEP", "TOKENIZER_FILE", "TokenizerError", "train_bpe", "doc_separator_id", "file_sha256",
           "save_tokenizer", "load_tokenizer_file"]
