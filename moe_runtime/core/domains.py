"""A multi-domain byte corpus built from text already on the machine (no download).

Legend: B sequences per batch, S sequence length, D domains.

Default domains (each a list of roots and file-name patterns; a missing root is skipped with a
printed message, a domain with no readable file is dropped with a message):
    python  the standard library's .py files (tests and site-packages excluded, as in core/data.py)
    c       C headers under /usr/include
    prose   English prose: license texts in /usr/share/common-licenses, and the copyright,
            README* and NEWS* files under /usr/share/doc (gzip-compressed ones are decompressed)

Selection and splits are deterministic: a domain's candidate files are visited in the order of
crc32("order:" + relative path) (a fixed pseudo-random order that does not favour any directory)
and taken until the domain holds `max_bytes` bytes, each document cut to its first
`max_doc_bytes` bytes, so the domains are of comparable size and loading takes about a second.
A document goes to validation when crc32(relative path) falls in the validation fraction (the
rule of core/data.py). Documents are joined by a NUL byte within a domain, never across domains,
so every training window, and hence every sequence, belongs to exactly one domain.

Batches: `DomainCorpus.batch` has Corpus.batch's signature, so `Trainer(corpus=...)` trains on it.
With mixing="domain" (default) every micro-batch comes from ONE domain, domain (index + micro) % D;
this is the situation the global-batch balancing paper describes (a micro-batch holds few domains
while the global batch holds them all). With mixing="mixed" each sequence draws its own domain.
`labelled_batch` returns the same windows plus each sequence's domain id.
"""
from __future__ import annotations

import fnmatch
import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from moe_runtime.core.data import SKIP_DIRS, Corpus, stdlib_files

MIXINGS = ("domain", "mixed")


@dataclass(frozen=True, kw_only=True)
class DomainSource:
    """Where one domain's documents live."""

    name: str
    """Domain label (also its key in reports)."""
    roots: tuple[str, ...]
    """Directories searched recursively."""
    patterns: tuple[str, ...]
    """fnmatch patterns on the file NAME (not the path), e.g. '*.h', 'README*'."""
    skip_dirs: frozenset[str] = frozenset()
    """Directory names whose subtrees are ignored."""


def default_sources() -> tuple[DomainSource, ...]:
    """Python source, C headers and English prose, from the standard paths of a Debian-like system."""
    stdlib_root, _ = stdlib_files()
    return (
        DomainSource(name="python", roots=(str(stdlib_root),), patterns=("*.py",), skip_dirs=frozenset(SKIP_DIRS)),
        DomainSource(name="c", roots=("/usr/include",), patterns=("*.h",)),
        DomainSource(name="prose", roots=("/usr/share/common-licenses", "/usr/share/doc"),
                     patterns=("copyright", "README", "README.txt", "README.md", "README.Debian", "README*.gz",
                               "NEWS", "NEWS.gz", "NEWS.Debian.gz", "Apache-*", "Artistic", "BSD", "CC0-*",
                               "GFDL*", "GPL*", "LGPL*", "MPL-*")),
    )


@dataclass(frozen=True)
class DomainInfo:
    """What the builder took for one domain."""

    name: str
    train_docs: int
    val_docs: int
    train_bytes: int
    val_bytes: int
    candidates: int
    """Matching files found (before the size cap)."""
    crc32: int
    """crc32 of the domain's train+val bytes: two machines built the same corpus iff these agree."""

    def to_dict(self) -> dict[str, int | str]:
        return dict(self.__dict__)


@dataclass
class DomainCorpus(Corpus):
    """A Corpus whose tokens are partitioned into labelled domains. See the module docstring."""

    domains: tuple[str, ...] = ()
    """Domain names; a domain id is an index into this tuple."""
    train_parts: list[torch.Tensor] = field(default_factory=list)
    """[N_train_d] int64 tokens of each domain."""
    val_parts: list[torch.Tensor] = field(default_factory=list)
    """[N_val_d] int64 tokens of each domain."""
    mixing: str = "domain"
    """'domain': one domain per micro-batch; 'mixed': one domain per sequence."""
    info: list[DomainInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing={self.mixing!r} is not one of {', '.join(MIXINGS)}; pick one of those")
        if not self.domains or len(self.domains) != len(self.train_parts) or len(self.domains) != len(self.val_parts):
            raise ValueError(f"DomainCorpus needs one train and one val tensor per domain; got {len(self.domains)} "
                             f"domains, {len(self.train_parts)} train and {len(self.val_parts)} val tensors")

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def batch(self, split: str, index: int, batch_size: int, seq_len: int, *, seed: int = 0,
              micro: int = 0, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets [B, S]; same contract as Corpus.batch (rank slices stack)."""
        x, y, _ = self.labelled_batch(split, index, batch_size, seq_len, seed=seed, micro=micro,
                                      rank=rank, world=world)
        return x, y

    def labelled_batch(self, split: str, index: int, batch_size: int, seq_len: int, *, seed: int = 0,
                       micro: int = 0, rank: int = 0, world: int = 1,
                       domain: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs [B, S], targets [B, S], domain id [B]) drawn from (seed, split, index, micro).

        `domain` forces every sequence to that domain (per-domain validation); otherwise the
        mixing rule picks it. Depends only on its arguments, so resumed runs see the same batches.
        """
        parts = self.train_parts if split == "train" else self.val_parts
        for d, data in enumerate(parts):
            if data.numel() < seq_len + 2:
                raise ValueError(f"domain {self.domains[d]!r}: the {split} split has {data.numel()} tokens, fewer "
                                 f"than seq_len+1={seq_len + 1}; use a shorter seq_len or a larger max_bytes")
        g = torch.Generator().manual_seed(_seed(seed, 0 if split == "train" else 1, index, micro,
                                                -1 if domain is None else domain))
        n = world * batch_size
        if domain is not None:
            if not 0 <= domain < self.num_domains:
                raise ValueError(f"domain={domain} is out of range; this corpus has domains 0..{self.num_domains - 1} "
                                 f"({', '.join(self.domains)})")
            dom_N = torch.full((n,), domain, dtype=torch.long)
        elif self.mixing == "domain":
            dom_N = torch.full((n,), (index + micro) % self.num_domains, dtype=torch.long)
        else:
            dom_N = torch.randint(0, self.num_domains, (n,), generator=g)
        u_N = torch.rand(n, generator=g, dtype=torch.float64)
        rows = []
        for d, u in zip(dom_N.tolist(), u_N.tolist()):
            data = parts[d]
            start = int(u * (data.numel() - seq_len - 1))
            rows.append(data[start:start + seq_len + 1])
        lo, hi = rank * batch_size, (rank + 1) * batch_size
        win = torch.stack(rows[lo:hi])
        return win[:, :-1].contiguous(), win[:, 1:].contiguous(), dom_N[lo:hi].clone()

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "mixing": self.mixing, "domains": [i.to_dict() for i in self.info]}


def _seed(*xs: int) -> int:
    # FNV-style mix of the batch coordinates (domain -1 = "chosen by the mixing rule").
    h = 0x5EED_D0_3A1
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def find_documents(src: DomainSource, log: Callable[[str], None] = print) -> list[tuple[str, Path]]:
    """(relative path, path) of every file matching src, over the roots that exist."""
    found: list[tuple[str, Path]] = []
    for root in map(Path, src.roots):
        if not root.is_dir():
            log(f"domains: skipping source {root} of domain {src.name!r}: directory not found")
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in src.skip_dirs]
            for name in filenames:
                if any(fnmatch.fnmatchcase(name, pat) for pat in src.patterns):
                    p = Path(dirpath) / name
                    if p.is_file() and not p.is_symlink():
                        found.append((p.relative_to(root).as_posix(), p))
    return found


def _read_text(p: Path, max_doc_bytes: int) -> bytes | None:
    """The first max_doc_bytes of a text file (gunzipped if .gz); None if unreadable or binary."""
    try:
        if p.suffix == ".gz":
            with gzip.open(p, "rb") as fh:
                raw = fh.read(max_doc_bytes)
        else:
            with open(p, "rb") as fh:
                raw = fh.read(max_doc_bytes)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if not raw.strip() or b"\x00" in raw:
        return None
    return raw


def _take_domain(src: DomainSource, max_bytes: int, max_doc_bytes: int, val_fraction: float,
                 log: Callable[[str], None]) -> tuple[list[bytes], list[bytes], int]:
    """(train docs, val docs, candidate count) for one domain, deterministic and size-capped."""
    docs = find_documents(src, log)
    # Visit order and split both come from crc32 of the relative path, with different salts, so
    # the validation documents are not simply the first ones visited.
    docs.sort(key=lambda rp: (zlib.crc32(b"order:" + rp[0].encode()), rp[0]))
    cut = int(val_fraction * 1_000_000)
    train, val, total = [], [], 0
    for rel, p in docs:
        if total >= max_bytes:
            break
        raw = _read_text(p, max_doc_bytes)
        if raw is None:
            continue
        (val if zlib.crc32(rel.encode()) % 1_000_000 < cut else train).append(raw)
        total += len(raw)
    if not val and len(train) > 1:
        val.append(train.pop())
    return train, val, len(docs)


def _join(docs: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"\x00".join(docs)), dtype=torch.uint8).long()


def build_domain_corpus(sources: tuple[DomainSource, ...] | None = None, *, max_bytes: int = 1_500_000,
                        max_doc_bytes: int = 32_768, val_fraction: float = 0.05, mixing: str = "domain",
                        vocab_size: int = 256, log: Callable[[str], None] = print) -> DomainCorpus:
    """A DomainCorpus from `sources` (default: python, c, prose); see the module docstring.

    Needs at least two usable domains; a missing root or an empty domain is skipped with a message.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if max_bytes <= 0 or max_doc_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} and max_doc_bytes={max_doc_bytes} must be > 0")
    if vocab_size < 256:
        raise ValueError(f"the domain corpus is byte-level (tokens 0..255) but vocab_size={vocab_size}; "
                         f"raise vocab_size to at least 256")
    sources = default_sources() if sources is None else sources
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique; got {names}")
    kept, train_parts, val_parts, info = [], [], [], []
    for src in sources:
        train, val, n_cand = _take_domain(src, max_bytes, max_doc_bytes, val_fraction, log)
        if not train or not val:
            log(f"domains: skipping domain {src.name!r}: {n_cand} matching files, {len(train) + len(val)} "
                f"readable text documents (need at least 2)")
            continue
        tr, va = _join(train), _join(val)
        crc = zlib.crc32(b"\x00".join(val), zlib.crc32(b"\x00".join(train)))
        kept.append(src.name)
        train_parts.append(tr)
        val_parts.append(va)
        info.append(DomainInfo(src.name, len(train), len(val), tr.numel(), va.numel(), n_cand, crc))
    if len(kept) < 2:
        raise ValueError(f"only {len(kept)} usable domain(s) ({', '.join(kept) or 'none'}) out of {names}; "
                         f"a domain study needs at least 2: pass sources that exist on this machine")
    sep = torch.zeros(1, dtype=torch.long)
    cat = lambda parts: torch.cat([t for p in parts for t in (p, sep)][:-1])  # noqa: E731
    desc = ", ".join(f"{i.name} {i.train_bytes // 1000}+{i.val_bytes // 1000} kB" for i in info)
    return DomainCorpus(cat(train_parts), cat(val_parts), f"domains ({desc}; train+val)", vocab_size,
                        domains=tuple(kept), train_parts=train_parts, val_parts=val_parts, mixing=mixing, info=info)


__all__ = ["DomainSource", "DomainInfo", "DomainCorpus", "default_sources", "find_documents",
           "build_domain_corpus", "MIXINGS"]
