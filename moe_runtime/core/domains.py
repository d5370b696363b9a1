"""A multi-domain corpus with a domain label per sequence: bytes by default, or BPE tokens.

Legend: B sequences per batch, S sequence length, D domains.

Default domains (each a list of roots and file-name patterns; a missing root is skipped with a
printed message, a domain with no readable file is dropped with a message), from text every
Debian-like machine has, no download:
    python  the standard library's .py files (tests and site-packages excluded, as in core/data.py)
    c       C headers under /usr/include
    prose   English prose: license texts in /usr/share/common-licenses, and the copyright,
            README* and NEWS* files under /usr/share/doc (gzip-compressed ones are decompressed)
The token-level balance study adds three natural languages, `study_sources()`: de, fr, es, the
German, French and Spanish translated manual pages that scripts/study-corpus.sh puts in
data/manpages/<lang>/ (or $MOE_STUDY_CORPUS). They are groff source: `roff_to_text` strips the
markup (reader="roff"). Nothing here downloads; without the pages study_sources() raises an error
naming the script.

Selection and splits are deterministic: a domain's candidate files are visited in the order of
crc32("order:" + relative path) (a fixed pseudo-random order that does not favour any directory)
and taken until the domain holds `max_bytes` bytes, each document cut to its first
`max_doc_bytes` bytes, so the domains are of comparable size and loading takes about a second.
A document goes to validation when crc32(relative path) falls in the validation fraction (the
rule of core/data.py). Documents are joined by a separator (byte 0, or the tokenizer's DOC_SEP
token, id 0) within a domain, never across domains, so every training window, and hence every
sequence, belongs to exactly one domain. With `tokenizer=` each document is BPE-encoded
(core/tokenizer.py); the byte caps still apply to the text, so token counts differ by domain.

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
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from moe_runtime.core.data import SKIP_DIRS, Corpus, stdlib_files

MIXINGS = ("domain", "mixed")
READERS = ("text", "roff")
MANPAGE_LANGS = {"de": "German", "fr": "French", "es": "Spanish"}
"""The translated manual pages scripts/study-corpus.sh fetches: domain name -> language."""
STUDY_CORPUS_ENV = "MOE_STUDY_CORPUS"
STUDY_CORPUS_SCRIPT = "scripts/study-corpus.sh"


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
    reader: str = "text"
    """'text': the file's bytes (gunzipped if .gz); 'roff': a (gzipped) manual page, its groff markup
    stripped to plain UTF-8 text by `roff_to_text`."""

    def __post_init__(self) -> None:
        if self.reader not in READERS:
            raise ValueError(f"DomainSource {self.name!r}: reader={self.reader!r} is not one of {', '.join(READERS)}")


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


def manpages_dir() -> Path:
    """Where scripts/study-corpus.sh put the translated manual pages: $MOE_STUDY_CORPUS, else
    data/manpages/ in the checkout (git-ignored)."""
    env = os.environ.get(STUDY_CORPUS_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data" / "manpages"


def missing_manpages(root: str | Path | None = None) -> list[str]:
    """The MANPAGE_LANGS whose folder under root (default manpages_dir()) is missing or empty."""
    root = manpages_dir() if root is None else Path(root)
    return [lang for lang in MANPAGE_LANGS if not (root / lang).is_dir() or not any((root / lang).rglob("*.gz"))]


def study_sources(manpages: str | Path | None = None) -> tuple[DomainSource, ...]:
    """The six domains of the token-level balance study: python, c, prose (default_sources) plus
    German, French and Spanish manual pages (groff source, from scripts/study-corpus.sh).

    Raises a one-line error naming the script when the manual pages are not there."""
    root = manpages_dir() if manpages is None else Path(manpages)
    missing = missing_manpages(root)
    if missing:
        raise FileNotFoundError(f"the study corpus needs the {', '.join(missing)} manual pages under {root}; "
                                f"run `bash {STUDY_CORPUS_SCRIPT}` first (or set {STUDY_CORPUS_ENV} to where it "
                                f"put them)")
    return default_sources() + tuple(
        DomainSource(name=lang, roots=(str(root / lang),), patterns=("*.gz",), reader="roff")
        for lang in MANPAGE_LANGS)


# ---------------------------------------------------------------- groff -> text
_ROFF_CHARS = {"em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "aq": "'", "dq": '"', "lq": "\u201c",
               "rq": "\u201d", "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae",
               "tm": "\u2122", "de": "\u00b0", "ti": "~", "ha": "^", "rs": "\\", "lB": "[", "rB": "]",
               "lC": "{", "rC": "}", "la": "\u27e8", "ra": "\u27e9", "Fo": "\u00ab", "Fc": "\u00bb",
               "fo": "\u2039", "fc": "\u203a", "r!": "\u00a1", "r?": "\u00bf", "pl": "+", "eq": "=",
               "mu": "\u00d7", "<=": "\u2264", ">=": "\u2265", "->": "\u2192", "<-": "\u2190", "ba": "|",
               "or": "|", "sl": "/", "at": "@", "sh": "#", "Do": "$", "ss": "\u00df", "ga": "`", "a^": "^"}
# Requests and macros whose arguments are running text (font and section macros); every other
# request line (.TH, .PP, .TP, .RS, .nf, .if, .ds, .de ... ) is dropped.
_ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "R", "SM", "SB", "BR", "BI", "IB", "IR", "RB", "RI", "IP", "TQ",
                     "UR", "MT", "Nm", "Nd", "Ar", "Fl", "Pa", "Xr", "Sh", "Ss", "Em", "Dq", "Ql", "Sy", "It"}
_ESCAPE = re.compile(r"""\\(?:
      f(?:\[[^\]]*\]|\(..|.)           # font change
    | [sS][+-]?(?:\d\d?|\[[^\]]*\]|\(..)   # point size
    | \*(?:\[[^\]]*\]|\(..|.)           # string interpolation
    | n[+-]?(?:\[[^\]]*\]|\(..|.)        # number register
    | [kmMVYgz](?:\[[^\]]*\]|\(..|.)     # misc one-argument escapes
    | [hvlLDoxHNbwAZRCX]'[^']*'            # escapes with a quoted argument
    | \((..)                               # \(xx special character
    | \[([^\]]*)\]                         # \[name] special character
    | (.)                                  # any other single-character escape
    )""", re.X)


def _escape(m: re.Match) -> str:
    name = m.group(1) or m.group(2)
    if name is not None:
        if name.startswith("u") and len(name) >= 5 and all(c in "0123456789ABCDEFabcdef" for c in name[1:]):
            return chr(int(name[1:], 16))
        return _ROFF_CHARS.get(name, "")
    c = m.group(3)
    if c is None:
        return ""
    return {"-": "-", "e": "\\", "\\": "\\", "~": " ", " ": " ", "0": " ", "t": "\t", ".": ".", "'": "'",
            "`": "`", '"': "", "&": "", "|": "", "^": "", ",": "", "/": "", ")": "", "%": "", "c": "",
            ":": "", "{": "", "}": "", "p": "", "a": "", "!": "", "E": ""}.get(c, c)


def roff_to_text(src: str) -> str:
    """Plain text of a groff manual page, deterministically: comments and macro definitions dropped,
    the arguments of text macros (.SH, .B, .IR, ...) kept with their quotes removed, other requests
    dropped, escapes resolved (\\fB and friends removed, \\- -> '-', \\(em and \\[u00E9] -> the
    character, unknown ones removed). Not a groff implementation: tables and conditionals lose
    their markup but keep their text lines."""
    out: list[str] = []
    skipping_def = False
    for line in src.splitlines():
        if skipping_def:
            if line.startswith(".."):
                skipping_def = False
            continue
        if line.startswith(('.\\"', "'\\\"", '\\"')):  # comment line
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            req = parts[0]
            if req in ("de", "de1", "am", "ig"):
                skipping_def = True
                continue
            if req not in _ROFF_TEXT_MACROS or len(parts) < 2:
                continue
            line = parts[1]
            if '"' in line:  # quoted arguments: "a b" c -> a b c
                toks = re.findall(r'"((?:[^"]|"")*)"?|(\S+)', line)
                line = " ".join((q or w).replace('""', '"') for q, w in toks if q or w)
        if "\\\"" in line:  # trailing comment
            line = line.split("\\\"", 1)[0]
        out.append(_ESCAPE.sub(_escape, line).rstrip())
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


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
    train_tokens: int = 0
    """Tokens of the train split, separators included (= train_bytes for a byte-level corpus)."""
    val_tokens: int = 0

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


def _read_text(p: Path, max_doc_bytes: int, reader: str = "text") -> bytes | None:
    """The first max_doc_bytes of a text file (gunzipped if .gz; for reader='roff' the plain text of
    the manual page, cut on a UTF-8 character boundary); None if unreadable, binary or empty."""
    limit = max_doc_bytes if reader == "text" else 1 << 22  # roff: strip the whole page, then cut
    try:
        if p.suffix == ".gz":
            with gzip.open(p, "rb") as fh:
                raw = fh.read(limit)
        else:
            with open(p, "rb") as fh:
                raw = fh.read(limit)
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error):
        return None
    if reader == "roff" and b"\x00" not in raw:
        text = roff_to_text(raw.decode("utf-8", errors="replace"))
        raw = text.encode("utf-8")[:max_doc_bytes].decode("utf-8", errors="ignore").encode("utf-8")
        if len(text.split()) < 20:  # a .so link or a stub page: not prose
            return None
    if not raw.strip() or b"\x00" in raw:
        return None
    return raw


@dataclass(frozen=True)
class DomainDocuments:
    """One domain's documents, split: what build_domain_corpus tokenizes (and a tokenizer trains on)."""

    name: str
    train: list[bytes]
    val: list[bytes]
    candidates: int

    def texts(self, split: str = "train") -> list[str]:
        """The split's documents as str (UTF-8; an invalid byte becomes U+FFFD)."""
        return [d.decode("utf-8", errors="replace") for d in (self.train if split == "train" else self.val)]


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
        raw = _read_text(p, max_doc_bytes, src.reader)
        if raw is None:
            continue
        (val if zlib.crc32(rel.encode()) % 1_000_000 < cut else train).append(raw)
        total += len(raw)
    if not val and len(train) > 1:
        val.append(train.pop())
    return train, val, len(docs)


def domain_documents(sources: tuple[DomainSource, ...] | None = None, *, max_bytes: int = 1_500_000,
                     max_doc_bytes: int = 32_768, val_fraction: float = 0.05,
                     log: Callable[[str], None] = print) -> list[DomainDocuments]:
    """Each usable domain's train and validation documents (see the module docstring for the rules).

    A missing root or a domain with fewer than two readable documents is skipped with a message;
    fewer than two usable domains is an error."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    if max_bytes <= 0 or max_doc_bytes <= 0:
        raise ValueError(f"max_bytes={max_bytes} and max_doc_bytes={max_doc_bytes} must be > 0")
    sources = default_sources() if sources is None else sources
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"domain names must be unique; got {names}")
    out = []
    for src in sources:
        train, val, n_cand = _take_domain(src, max_bytes, max_doc_bytes, val_fraction, log)
        if not train or not val:
            log(f"domains: skipping domain {src.name!r}: {n_cand} matching files, {len(train) + len(val)} "
                f"readable text documents (need at least 2)")
            continue
        out.append(DomainDocuments(src.name, train, val, n_cand))
    if len(out) < 2:
        raise ValueError(f"only {len(out)} usable domain(s) ({', '.join(d.name for d in out) or 'none'}) out of "
                         f"{names}; a domain study needs at least 2: pass sources that exist on this machine")
    return out


def _join(docs: list[bytes]) -> torch.Tensor:
    return torch.frombuffer(bytearray(b"\x00".join(docs)), dtype=torch.uint8).long()


def _join_tokens(tokenizer: Any, docs: list[str], sep: int) -> torch.Tensor:
    ids: list[int] = []
    for i, enc in enumerate(tokenizer.encode_batch(docs, add_special_tokens=False)):
        if i:
            ids.append(sep)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def build_domain_corpus(sources: tuple[DomainSource, ...] | None = None, *, max_bytes: int = 1_500_000,
                        max_doc_bytes: int = 32_768, val_fraction: float = 0.05, mixing: str = "domain",
                        vocab_size: int | None = None, tokenizer: Any = None,
                        documents: list[DomainDocuments] | None = None,
                        log: Callable[[str], None] = print) -> DomainCorpus:
    """A DomainCorpus from `sources` (default: python, c, prose); see the module docstring.

    Byte-level (token = byte, vocab 256, documents joined by NUL) unless `tokenizer` (a
    `tokenizers.Tokenizer`, e.g. core.tokenizer.train_bpe's) is given: then each document is
    encoded with it, documents are joined by its DOC_SEP token and vocab_size defaults to the
    tokenizer's. `documents` (from domain_documents) skips reading the sources again.
    Needs at least two usable domains; a missing root or an empty domain is skipped with a message.
    """
    if documents is None:
        documents = domain_documents(sources, max_bytes=max_bytes, max_doc_bytes=max_doc_bytes,
                                     val_fraction=val_fraction, log=log)
    if tokenizer is None:
        vocab_size = 256 if vocab_size is None else vocab_size
        if vocab_size < 256:
            raise ValueError(f"the domain corpus is byte-level (tokens 0..255) but vocab_size={vocab_size}; "
                             f"raise vocab_size to at least 256 or pass a tokenizer")
        sep_id, unit = 0, "bytes"
    else:
        from moe_runtime.core.tokenizer import doc_separator_id
        sep_id, unit = doc_separator_id(tokenizer), "tokens"
        n_vocab = tokenizer.get_vocab_size()
        vocab_size = n_vocab if vocab_size is None else vocab_size
        if vocab_size < n_vocab:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's {n_vocab} tokens; "
                             f"leave vocab_size out to use the tokenizer's")
    kept, train_parts, val_parts, info = [], [], [], []
    for doc in documents:
        if tokenizer is None:
            tr, va = _join(doc.train), _join(doc.val)
        else:
            tr, va = _join_tokens(tokenizer, doc.texts("train"), sep_id), _join_tokens(tokenizer, doc.texts("val"), sep_id)
        crc = zlib.crc32(b"\x00".join(doc.val), zlib.crc32(b"\x00".join(doc.train)))
        kept.append(doc.name)
        train_parts.append(tr)
        val_parts.append(va)
        joined = lambda docs: sum(map(len, docs)) + len(docs) - 1  # noqa: E731  (bytes, NUL-joined)
        info.append(DomainInfo(doc.name, len(doc.train), len(doc.val), joined(doc.train), joined(doc.val),
                               doc.candidates, crc, tr.numel(), va.numel()))
    sep = torch.full((1,), sep_id, dtype=torch.long)
    cat = lambda parts: torch.cat([t for p in parts for t in (p, sep)][:-1])  # noqa: E731
    desc = ", ".join(f"{i.name} {i.train_bytes // 1000}+{i.val_bytes // 1000} kB" for i in info)
    return DomainCorpus(cat(train_parts), cat(val_parts), f"domains ({desc}; train+val; {unit})", vocab_size,
                        domains=tuple(kept), train_parts=train_parts, val_parts=val_parts, mixing=mixing, info=info)


__all__ = ["DomainSource", "DomainInfo", "DomainCorpus", "DomainDocuments", "default_sources", "study_sources",
           "find_documents", "domain_documents", "build_domain_corpus", "roff_to_text", "manpages_dir",
           "missing_manpages", "MIXINGS", "MANPAGE_LANGS", "STUDY_CORPUS_SCRIPT"]
