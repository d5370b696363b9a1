import numpy as np
import pytest
import torch

from moe_runtime.core.data import load_corpus


def test_default_corpus_is_stdlib_and_deterministic():
    a, b = load_corpus(), load_corpus()
    assert "stdlib" in a.source and a.train.numel() > 1_000_000 and a.val.numel() > 10_000
    assert torch.equal(a.val, b.val)
    x1, y1 = a.batch("train", 7, 4, 32, seed=3)
    x2, y2 = b.batch("train", 7, 4, 32, seed=3)
    assert torch.equal(x1, x2) and torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(a.batch("train", 8, 4, 32, seed=3)[0], x1)
    assert 2.0 < a.unigram_entropy() < 5.6


def test_rank_slices_stack_to_single_process_batch():
    c = load_corpus()
    full, _ = c.batch("train", 2, 8, 16, micro=1)
    parts = [c.batch("train", 2, 2, 16, micro=1, rank=r, world=4)[0] for r in range(4)]
    assert torch.equal(torch.cat(parts), full)


def test_text_file_dir_and_token_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 200)
    c = load_corpus(tmp_path / "a.txt")
    assert c.train.numel() + c.val.numel() == 2400
    d = tmp_path / "docs"
    d.mkdir()
    for i in range(30):
        (d / f"{i}.txt").write_text(f"document {i} " * 50)
    (d / "blob.bin.dat").write_bytes(b"\x00\x01" * 100)  # binary: skipped
    c = load_corpus(d)
    assert c.val.numel() > 0 and "30" not in c.source.split("(")[0]
    tok = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).__mod__(300).astype(np.uint16).tofile(tok)
    c = load_corpus(tok, vocab_size=300)
    assert c.train.max() == 299 and c.train.numel() + c.val.numel() == 1000


def test_bad_data_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    tok = tmp_path / "t.bin"
    np.arange(1000, dtype=np.uint16).tofile(tok)
    with pytest.raises(ValueError, match="vocab_size=256; raise vocab_size to at least 1000"):
        load_corpus(tok)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="not a multiple of 2"):
        load_corpus(odd)
    binary = tmp_path / "x.txt"
    binary.write_bytes(b"ab\x00cd")
    with pytest.raises(ValueError, match="NUL bytes"):
        load_corpus(binary)
    short = tmp_path / "s.txt"
    short.write_text("tiny text " * 10)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        load_corpus(short).batch("val", 0, 2, 64)
