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


def tokenizer_training_corpus(run: Any, tokenizer_path: str | Path, data: str | Path | None, out_dir: str | Path) -> Any:
    """`moe train --tokenizer PATH --data TEXT`: the Corpus of TEXT encoded with the tokenizer.

    Sets run.model.vocab_size to the tokenizer's vocabulary (when it is the byte default 256; a
    larger one is kept, a smaller one is an error) and run.model.tokenizer_sha256 to the file's
    digest, and copies the file to out_dir/tokenizer.json, where generate and serve find it.
    A run directory that already holds a different tokenizer.json is refused (resume needs the same one).
    """
    import shutil

    from moe_runtime.core.data import TOKEN_SUFFIXES
    from moe_runtime.core.hf.load import tokenized_corpus
    if data is None:
        raise TokenizerError("--tokenizer needs --data: a text file or a directory of text files to encode with it "
                             "(the default corpus is byte-level)")
    if Path(data).suffix in TOKEN_SUFFIXES:
        raise TokenizerError(f"--data {data} already holds token ids; drop --tokenizer, or pass text to encode")
    tok, sha = load_tokenizer_file(tokenizer_path)
    n_vocab = tok.get_vocab_size()
    if run.model.vocab_size == 256:
        run.model.vocab_size = n_vocab
    elif run.model.vocab_size < n_vocab:
        raise TokenizerError(f"--tokenizer {tokenizer_path} has {n_vocab} tokens but the config's vocab_size is "
                             f"{run.model.vocab_size}; raise vocab_size to at least {n_vocab} (or leave it at 256)")
    if run.model.tokenizer_sha256 not in (None, sha):
        raise TokenizerError(f"the config names tokenizer sha256 {run.model.tokenizer_sha256[:12]}... but "
                             f"--tokenizer {tokenizer_path} is {sha[:12]}...; pass the matching file")
    run.model.tokenizer_sha256 = sha
    dest = Path(out_dir) / TOKENIZER_FILE
    if dest.is_file() and file_sha256(dest) != sha:
        raise TokenizerError(f"{dest} is a different tokenizer than --tokenizer {tokenizer_path}; resume with "
                             f"the same file or train into a new --out directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.is_file():
        shutil.copyfile(Path(tokenizer_path) / TOKENIZER_FILE if Path(tokenizer_path).is_dir() else tokenizer_path,
                        dest)
    return tokenized_corpus(tok, data, run.model.vocab_size)


def checkpoint_tokenizer(run: Any, checkpoint_dir: str | Path, override: str | Path | None = None) -> Any:
    """The tokenizer a checkpoint's model was trained with, or None for a model without one.

    run: the checkpoint's RunConfig; its model.tokenizer_sha256 names the file. Looked for, in
    order: `override` (--tokenizer), the checkpoint directory, its parent and the run directory
    (checkpoints/step_N/../..), where `moe train --tokenizer` copied it. The file's sha256 must match.
    """
    want = run.model.tokenizer_sha256
    if override is not None:
        if want is None:
            raise TokenizerError(f"--tokenizer {override}: this checkpoint's model was trained without a tokenizer "
                                 f"(vocab {run.model.vocab_size}, byte-level); drop --tokenizer")
        return load_tokenizer_file(override, expect_sha256=want)[0]
    if want is None:
        return None
    ck = Path(checkpoint_dir)
    for d in (ck, ck.parent, ck.parent.parent):
        if (d / TOKENIZER_FILE).is_file() and file_sha256(d / TOKENIZER_FILE) == want:
            return load_tokenizer_file(d / TOKENIZER_FILE, expect_sha256=want)[0]
    raise TokenizerError(f"{ck}: the model was trained with a tokenizer (sha256 {want[:12]}...) but no matching "
                         f"{TOKENIZER_FILE} is in the checkpoint or run directory; pass --tokenizer PATH to that file")


__all__ = ["checkpoint_tokenizer", "tokenizer_training_corpus", "DOC_SEP", "TOKENIZER_FILE", "TokenizerError", "train_bpe", "doc_separator_id", "file_sha256",
           "save_tokenizer", "load_tokenizer_file"]
