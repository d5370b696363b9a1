"""Corpora -> token batches.

Legend: B sequences per batch, S sequence length.

The default corpus is the Python standard library's own .py files on the running machine
(tests and site-packages excluded), read as bytes (vocab 256), so `moe train` needs no download.
`--data` takes a text file, a directory of text files, or a flat binary token file (`.bin`,
little-endian uint16 tokens, the nanoGPT convention; `.u32` for uint32 tokens).

Splits are deterministic: a directory's documents go to validation when crc32(relative path)
falls in the validation fraction (stable across machines and file orderings); a single file or
token stream keeps its last fraction for validation. Batches are random windows drawn from a
generator seeded by (seed, step, micro-batch), so a resumed run sees exactly the same batches.
"""
from __future__ import annotations

import math
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SKIP_DIRS = {"test", "tests", "idle_test", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
TOKEN_SUFFIXES = {".bin": np.uint16, ".u16": np.uint16, ".u32": np.uint32}


@dataclass
class Corpus:
    train: torch.Tensor
    """[N_train] int64 token ids."""
    val: torch.Tensor
    """[N_val] int64 token ids."""
    source: str
    """Human-readable description of where the tokens came from."""
    vocab_size: int

    def unigram_entropy(self) -> float:
        """Cross-entropy (nats/token) of the best context-free predictor: the train unigram
        distribution evaluated on the validation split (add-one smoothed)."""
        counts = torch.bincount(self.train, minlength=self.vocab_size).double() + 1.0
        logp = (counts / counts.sum()).log()
        return float(-logp[self.val].mean())

    def batch(self, split: str, index: int, batch_size: int, seq_len: int, *, seed: int = 0,
              micro: int = 0, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets [B, S] for step `index`, micro-batch `micro`.

        The generator draws world * batch_size windows; rank r gets rows [r*B, (r+1)*B). So the
        same (index, micro) with world=1 and batch_size*world returns all ranks' rows stacked:
        the single-process twin of a data-parallel batch.
        """
        data = self.train if split == "train" else self.val
        if data.numel() < seq_len + 2:
            raise ValueError(f"the {split} split has {data.numel()} tokens, fewer than seq_len+1={seq_len + 1}; "
                             f"use a shorter --seq-len or more data")
        g = torch.Generator().manual_seed(_mix(seed, 0 if split == "train" else 1, index, micro))
        starts = torch.randint(0, data.numel() - seq_len - 1, (world * batch_size,), generator=g)
        starts = starts[rank * batch_size:(rank + 1) * batch_size]
        win = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def _mix(*xs: int) -> int:
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file())
    return root, files


def _is_text(raw: bytes) -> bool:
    return b"\x00" not in raw[:8192]


def _split_docs(root: Path, files: list[Path], val_fraction: float) -> tuple[list[bytes], list[bytes]]:
    train, val = [], []
    cut = int(val_fraction * 1_000_000)
    for p in files:
        raw = p.read_bytes()
        if not raw or not _is_text(raw):
            continue
        key = zlib.crc32(str(p.relative_to(root)).encode()) % 1_000_000
        (val if key < cut else train).append(raw)
    if not val and len(train) > 1:
        val.append(train.pop())
    return train, val


def _bytes_tensor(docs: list[bytes]) -> torch.Tensor:
    # Documents are joined by a NUL byte, which never occurs inside a text document.
    buf = b"\x00".join(docs)
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).long()


def load_corpus(path: str | Path | None = None, *, val_fraction: float = 0.05, vocab_size: int = 256) -> Corpus:
    """The default corpus (path=None) or a user's text file, text directory or token file."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if path is None:
        root, files = stdlib_files()
        if not files:
            raise ValueError(f"no .py files found under the standard library at {root}; pass --data PATH")
        train, val = _split_docs(root, files, val_fraction)
        source = f"python stdlib {root} ({len(train)} train / {len(val)} val files)"
        return _byte_corpus(train, val, source, vocab_size)
    p = Path(path)
    if not p.exists():
        raise ValueError(f"--data {p} does not exist; pass a text file, a directory of text files or a .bin token file")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        train, val = _split_docs(p, files, val_fraction)
        if not train:
            raise ValueError(f"--data {p}: no non-empty text files found (binary files are skipped)")
        return _byte_corpus(train, val, f"directory {p} ({len(train)} train / {len(val)} val files)", vocab_size)
    if p.suffix in TOKEN_SUFFIXES:
        return _token_file(p, TOKEN_SUFFIXES[p.suffix], val_fraction, vocab_size)
    raw = p.read_bytes()
    if not _is_text(raw):
        raise ValueError(f"--data {p} holds NUL bytes: it is not a text file; token files must end in "
                         f"{', '.join(TOKEN_SUFFIXES)}")
    tokens = _bytes_tensor([raw])
    n_val = max(1, int(len(tokens) * val_fraction))
    return Corpus(tokens[:-n_val], tokens[-n_val:], f"text file {p}", _check_vocab(256, vocab_size, p))


def _byte_corpus(train: list[bytes], val: list[bytes], source: str, vocab_size: int) -> Corpus:
    if not val:
        raise ValueError(f"{source}: too little data to hold out a validation split; add more files")
    return Corpus(_bytes_tensor(train), _bytes_tensor(val), source, _check_vocab(256, vocab_size, source))


def _check_vocab(needed: int, vocab_size: int, where) -> int:
    if needed > vocab_size:
        raise ValueError(f"{where}: tokens go up to {needed - 1} but the model's vocab_size={vocab_size}; "
                         f"raise vocab_size to at least {needed}")
    return vocab_size


def _token_file(p: Path, dtype, val_fraction: float, vocab_size: int) -> Corpus:
    itemsize = np.dtype(dtype).itemsize
    if p.stat().st_size % itemsize:
        raise ValueError(f"--data {p}: size {p.stat().st_size} bytes is not a multiple of {itemsize} "
                         f"({np.dtype(dtype).name} tokens); the file is truncated or not a token file")
    arr = np.fromfile(p, dtype=dtype).astype(np.int64)
    if arr.size < 16:
        raise ValueError(f"--data {p}: only {arr.size} tokens")
    _check_vocab(int(arr.max()) + 1, vocab_size, f"--data {p}")
    tokens = torch.from_numpy(arr)
    n_val = max(1, int(math.ceil(len(tokens) * val_fraction)))
    return Corpus(tokens[:-n_val], tokens[-n_val:], f"token file {p} ({len(tokens)} tokens)", vocab_size)
