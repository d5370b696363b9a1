"""The multi-domain corpus builder: determinism, labels, splits, caps and skipping missing sources."""
import gzip
import zlib
from pathlib import Path

import pytest
import torch

from moe_runtime.core.domains import DomainCorpus, DomainSource, build_domain_corpus, default_sources
from moe_runtime.core.train import Trainer
from tests.helpers import small_run

# Each domain writes with its own alphabet, so any window's bytes tell which domain it came from.
ALPHABETS = {"letters": b"abcdefghij \n", "digits": b"0123456789;\n", "punct": b"{}()[]<>+-*\n"}


def _write_domain(root: Path, name: str, n_files: int, size: int, suffix: str, order=range) -> None:
    alpha = ALPHABETS[name]
    root.mkdir(parents=True, exist_ok=True)
    for i in order(n_files):
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}{i}".encode()))
        body = bytes(alpha[j] for j in torch.randint(0, len(alpha), (size,), generator=g).tolist())
        sub = root / f"d{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}{suffix}").write_bytes(body)


def _sources(tmp: Path, extra_root: str | None = None) -> tuple[DomainSource, ...]:
    return (DomainSource(name="letters", roots=(str(tmp / "letters"),) + ((extra_root,) if extra_root else ()),
                         patterns=("*.txt", "*.txt.gz")),
            DomainSource(name="digits", roots=(str(tmp / "digits"),), patterns=("*.h",)),
            DomainSource(name="punct", roots=(str(tmp / "punct"),), patterns=("*.py",), skip_dirs=frozenset({"d2"})))


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    _write_domain(tmp_path / "letters", "letters", 40, 700, ".txt")
    _write_domain(tmp_path / "digits", "digits", 40, 700, ".h")
    _write_domain(tmp_path / "punct", "punct", 40, 700, ".py")
    return tmp_path


def _build(root: Path, **kw) -> DomainCorpus:
    kw.setdefault("val_fraction", 0.2)
    return build_domain_corpus(_sources(root), **kw)


def _domain_of(row: torch.Tensor) -> set[str]:
    present = set(row.tolist()) - {0, ord("\n")}
    return {n for n, a in ALPHABETS.items() if present <= set(a)}


def test_every_sequence_carries_its_domain_label(tree):
    c = _build(tree, log=lambda s: None)
    assert c.domains == ("letters", "digits", "punct") and c.num_domains == 3
    for split in ("train", "val"):
        for mixing in ("domain", "mixed"):
            c.mixing = mixing
            for index in range(6):
                x, y, dom = c.labelled_batch(split, index, 8, 24, seed=3, micro=index % 4)
                assert x.shape == y.shape == (8, 24) and dom.shape == (8,)
                assert torch.equal(x[:, 1:], y[:, :-1])
                for row, d in zip(torch.cat([x, y[:, -1:]], 1), dom.tolist()):
                    assert _domain_of(row) == {c.domains[d]}


def test_domain_mixing_gives_one_domain_per_micro_batch(tree):
    c = _build(tree, log=lambda s: None)
    seen = [c.labelled_batch("train", 5, 4, 16, micro=m)[2] for m in range(6)]
    assert [d.unique().tolist() for d in seen] == [[(5 + m) % 3] for m in range(6)]
    mixed = _build(tree, mixing="mixed", log=lambda s: None)
    doms = torch.cat([mixed.labelled_batch("train", i, 16, 16)[2] for i in range(4)])
    assert sorted(doms.unique().tolist()) == [0, 1, 2]
    forced = c.labelled_batch("val", 0, 4, 16, domain=1)[2]
    assert forced.tolist() == [1, 1, 1, 1]


def test_builder_and_batches_are_deterministic_and_independent_of_creation_order(tree, tmp_path_factory):
    other = tmp_path_factory.mktemp("reversed")
    for name, suffix in (("letters", ".txt"), ("digits", ".h"), ("punct", ".py")):
        _write_domain(other / name, name, 40, 700, suffix, order=lambda n: reversed(range(n)))
    a, b = _build(tree, log=lambda s: None), _build(other, log=lambda s: None)
    for pa, pb in zip(a.train_parts + a.val_parts, b.train_parts + b.val_parts):
        assert torch.equal(pa, pb)
    assert [i.crc32 for i in a.info] == [i.crc32 for i in b.info]
    x1, _ = a.batch("train", 7, 4, 32, seed=2, micro=1)
    x2, _ = b.batch("train", 7, 4, 32, seed=2, micro=1)
    assert torch.equal(x1, x2)
    assert not torch.equal(a.batch("train", 8, 4, 32, seed=2, micro=1)[0], x1)
    assert not torch.equal(a.batch("train", 7, 4, 32, seed=3, micro=1)[0], x1)


def test_validation_split_follows_crc32_of_the_relative_path(tree):
    c = _build(tree, log=lambda s: None)
    cut = int(0.2 * 1_000_000)
    expected_val = sum(zlib.crc32(f"d{i % 3}/f{i}.h".encode()) % 1_000_000 < cut for i in range(40))
    info = {i.name: i for i in c.info}
    assert 0 < expected_val < 40
    assert info["digits"].val_docs == expected_val and info["digits"].train_docs == 40 - expected_val
    assert info["digits"].val_bytes == 700 * expected_val + expected_val - 1  # NUL between documents
    # skip_dirs: punct's d2/ holds 13 of its 40 files
    assert info["punct"].candidates == 40 - len(range(2, 40, 3))


def test_size_caps_and_document_truncation(tree):
    c = _build(tree, max_bytes=5000, max_doc_bytes=300, log=lambda s: None)
    for i in c.info:
        docs = i.train_docs + i.val_docs
        assert i.train_bytes + i.val_bytes == 300 * docs + (i.train_docs - 1) + (i.val_docs - 1)
        assert docs == 17  # stops once 5000 bytes are taken: ceil(5000 / 300) documents
        assert i.candidates > docs


def test_missing_sources_are_skipped_with_a_message(tree):
    msgs: list[str] = []
    srcs = _sources(tree, extra_root=str(tree / "nowhere"))
    srcs = srcs + (DomainSource(name="ghost", roots=(str(tree / "absent"),), patterns=("*",)),)
    c = build_domain_corpus(srcs, val_fraction=0.2, log=msgs.append)
    assert c.domains == ("letters", "digits", "punct")
    assert any("nowhere" in m and "letters" in m and "not found" in m for m in msgs)
    assert any("skipping domain 'ghost'" in m for m in msgs)


def test_binary_files_are_skipped_and_gzip_is_read(tree):
    (tree / "letters" / "d0" / "blob.txt").write_bytes(b"abc\x00\x01\x02" * 50)
    (tree / "letters" / "d1" / "z.txt.gz").write_bytes(gzip.compress(b"jihgfedcba \n" * 40))
    c = _build(tree, log=lambda s: None)
    info = {i.name: i for i in c.info}
    assert info["letters"].candidates == 42
    assert info["letters"].train_docs + info["letters"].val_docs == 41  # the NUL-holding file is not text
    data = torch.cat(c.train_parts[:1] + c.val_parts[:1])
    assert b"jihgfedcba \njihg" in bytes(data.to(torch.uint8).tolist())
    assert _domain_of(data[data != 0][:2000]) == {"letters"}


def test_too_few_domains_and_bad_arguments_are_refused(tree):
    one = (DomainSource(name="letters", roots=(str(tree / "letters"),), patterns=("*.txt",)),
           DomainSource(name="none", roots=(str(tree / "letters"),), patterns=("*.nothing",)))
    with pytest.raises(ValueError, match="only 1 usable domain"):
        build_domain_corpus(one, log=lambda s: None)
    with pytest.raises(ValueError, match="mixing='sometimes'"):
        _build(tree, mixing="sometimes", log=lambda s: None)
    with pytest.raises(ValueError, match="names must be unique"):
        build_domain_corpus(_sources(tree)[:1] * 2, log=lambda s: None)
    c = _build(tree, log=lambda s: None)
    with pytest.raises(ValueError, match="domain=3 is out of range"):
        c.labelled_batch("val", 0, 2, 8, domain=3)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        c.batch("val", 0, 2, 100_000)


def test_rank_slices_stack_to_the_single_process_batch(tree):
    c = _build(tree, mixing="mixed", log=lambda s: None)
    full, _, dom = c.labelled_batch("train", 2, 8, 16, micro=1)
    parts = [c.labelled_batch("train", 2, 2, 16, micro=1, rank=r, world=4) for r in range(4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), full) and torch.equal(torch.cat([p[2] for p in parts]), dom)


def test_trainer_consumes_a_domain_corpus(tree):
    c = _build(tree, log=lambda s: None)
    assert isinstance(c, DomainCorpus) and c.train.numel() == sum(p.numel() for p in c.train_parts) + 2
    t = Trainer(small_run(), out_dir=tree / "run", corpus=c, progress=False, plots=False)
    first = t.train_step()["loss"]
    for _ in range(3):
        last = t.train_step()["loss"]
    assert torch.isfinite(torch.tensor(last)) and last < first
    assert t.evaluate(batches=3)["val_loss"] > 0


def test_default_sources_on_this_machine():
    present = [s for s in default_sources() if any(Path(r).is_dir() for r in s.roots)]
    if len(present) < 2:
        pytest.skip("fewer than two of the default domain sources exist on this machine")
    c = build_domain_corpus(max_bytes=20_000, max_doc_bytes=4096, log=lambda s: None)
    assert set(c.domains) <= {"python", "c", "prose"} and len(c.domains) >= 2
    for i in c.info:
        assert 20_000 <= i.train_bytes + i.val_bytes < 20_000 + 4096 + i.train_docs + i.val_docs
