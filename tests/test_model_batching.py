"""Batched generation with prompts of different lengths: left padding, per-row positions, rows of
one KV cache at different positions (continuous batching). Each row of a padded batch must give
the logits (within fp32 rounding) and greedy tokens of the same prompt run alone."""
from __future__ import annotations

import pytest
import torch

from moe_runtime.core.model import KVCache, MoETransformer
from tests.helpers import assert_close, small_model

PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [11, 2, 9, 9, 30]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoETransformer(small_model(n_kv_heads=2, max_seq_len=48)).eval()


@torch.no_grad()
def alone(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """The plain path: one prompt, no padding, greedy; the logits of every drawn token."""
    cache = KVCache.empty(model.cfg, 1, len(prompt) + n, "cpu", torch.float32)
    logits = model(torch.tensor([prompt]), cache).logits[:, -1]
    out, seen = [], []
    for _ in range(n):
        seen.append(logits[0])
        out.append(int(logits.argmax(-1)))
        logits = model(torch.tensor([[out[-1]]]), cache).logits[:, -1]
    return out, torch.stack(seen)


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    S = max(map(len, prompts))
    ids = torch.tensor([[pad] * (S - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (S - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def test_padded_batch_rows_equal_each_prompt_alone(model):
    n = 6
    ids, mask = left_pad(PROMPTS)
    cache = KVCache.empty(model.cfg, len(PROMPTS), ids.shape[1] + n, "cpu", torch.float32)
    logits = model(ids, cache, attention_mask_BS=mask).logits[:, -1]
    out, seen = [], []
    for _ in range(n):
        seen.append(logits)
        out.append(logits.argmax(-1))
        logits = model(out[-1][:, None], cache).logits[:, -1]
    tokens, seen = torch.stack(out, 1), torch.stack(seen, 1)
    for b, p in enumerate(PROMPTS):
        want_tokens, want_logits = alone(model, p, n)
        assert tokens[b].tolist() == want_tokens, f"row {b}"
        assert_close(seen[b], want_logits, torch.float32, f"row {b} logits")
    assert cache.next_pos == [len(p) + n for p in PROMPTS]


@torch.no_grad()
def test_padded_forward_without_cache_matches_alone(model):
    ids, mask = left_pad(PROMPTS)
    got = model(ids, attention_mask_BS=mask).logits
    for b, p in enumerate(PROMPTS):
        want = model(torch.tensor([p])).logits[0]
        assert_close(got[b, -len(p):], want, torch.float32, f"row {b}")


@torch.no_grad()
def test_row_joins_running_batch_and_freed_row_is_reused(model):
    """Row 1 starts later (prefilled alone into a 2-row cache while row 0 is mid-decode), then
    row 0 finishes, is freed and takes a new prompt: every row still equals its prompt alone."""
    n = 5
    cache = KVCache.empty(model.cfg, 2, 40, "cpu", torch.float32)
    a, b, c = PROMPTS
    la = model(torch.tensor([a]), cache, cache_rows=[0]).logits[:, -1]
    ta = [int(la.argmax(-1))]
    la = model(torch.tensor([[ta[-1]]]), cache, cache_rows=[0]).logits[:, -1]
    ta.append(int(la.argmax(-1)))
    lb = model(torch.tensor([b]), cache, cache_rows=[1]).logits[:, -1]  # joins: prefill of row 1 only
    tb = [int(lb.argmax(-1))]
    for _ in range(n - 2):  # both rows decode together, at different positions
        logits = model(torch.tensor([[ta[-1]], [tb[-1]]]), cache).logits[:, -1]
        ta.append(int(logits[0].argmax()))
        tb.append(int(logits[1].argmax()))
    assert ta == alone(model, a, n)[0]
    cache.reset_row(0)  # row 0 finished; a new sequence takes it
    lc = model(torch.tensor([c]), cache, cache_rows=[0]).logits[:, -1]
    tc = [int(lc.argmax(-1))]
    for _ in range(n - 1):
        logits = model(torch.tensor([[tc[-1]], [tb[-1]]]), cache).logits[:, -1]
        tc.append(int(logits[0].argmax()))
        tb.append(int(logits[1].argmax()))
    assert tc == alone(model, c, n)[0]
    assert tb == alone(model, b, len(tb))[0]


@torch.no_grad()
def test_subset_of_rows_decodes_while_others_wait(model):
    cache = KVCache.empty(model.cfg, 3, 30, "cpu", torch.float32)
    ids, mask = left_pad(PROMPTS)
    model(ids, cache, attention_mask_BS=mask)
    before = cache.k[:, 1].clone()
    logits = model(torch.tensor([[3], [3]]), cache, cache_rows=[2, 0]).logits[:, -1]
    assert torch.equal(cache.k[:, 1], before), "row 1 was not part of the step"
    cache2 = KVCache.empty(model.cfg, 1, 30, "cpu", torch.float32)
    model(torch.tensor([PROMPTS[2]]), cache2)
    assert_close(logits[0], model(torch.tensor([[3]]), cache2).logits[0, -1], torch.float32, "row 2")


def test_bad_rows_mask_and_overflow_are_named(model):
    cache = KVCache.empty(model.cfg, 2, 8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="cache_rows"):
        model(torch.tensor([[1, 2]]), cache, cache_rows=[2])
    with pytest.raises(ValueError, match="attention_mask_BS has shape"):
        model(torch.tensor([[1, 2]]), cache, attention_mask_BS=torch.ones(1, 3), cache_rows=[0])
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.ones(2, 9, dtype=torch.long), cache, attention_mask_BS=torch.ones(2, 9))
    with pytest.raises(ValueError, match="row 5"):
        cache.reset_row(5)
    with pytest.raises(ValueError, match="a batch of 1 rows for a KV cache of 2 rows"):
        model(torch.tensor([[1, 2]]), cache)


# ---------------------------------------------------------------- rows without padding (decode-step fast path)
def _general_path(monkeypatch):
    monkeypatch.setattr(MoETransformer, "_unpadded_batch", lambda *a, **k: None)


@torch.no_grad()
def _rows_at_different_lengths(model) -> tuple[KVCache, list[list[int]]]:
    """A 4-row cache, each row prefilled alone (no padding), at lengths 7, 3, 5, 1."""
    cache = KVCache.empty(model.cfg, 4, 40, "cpu", torch.float32)
    prompts = PROMPTS + [[17]]
    for r, p in enumerate(prompts):
        model(torch.tensor([p]), cache, cache_rows=[r])
    return cache, prompts


@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 2], [3, 0, 2], [2]])
@torch.no_grad()
def test_unpadded_rows_equal_the_general_path(model, monkeypatch, rows):
    """Decode (S=1) and a 3-token step on rows at different lengths: the unpadded path (views
    for consecutive rows, a gather otherwise, one mask per pass) gives the general path's logits
    and leaves the cache in the same state."""
    seen = []
    real = MoETransformer._unpadded_batch

    def spy(self, *a):
        out = real(self, *a)
        seen.append(out is not None and (out[0].row_span is not None) == (rows == list(range(rows[0], rows[0] + len(rows)))))
        return out

    monkeypatch.setattr(MoETransformer, "_unpadded_batch", spy)
    fast_cache, _ = _rows_at_different_lengths(model)
    seen.clear()
    ids1, ids3 = torch.tensor([[3 + r] for r in rows]), torch.tensor([[4, 5 + r, 6] for r in rows])
    fast = [model(ids1, fast_cache, cache_rows=rows).logits, model(ids3, fast_cache, cache_rows=rows).logits]
    assert seen and all(seen), "the unpadded path (view for consecutive rows) was not taken"
    _general_path(monkeypatch)
    slow_cache, _ = _rows_at_different_lengths(model)
    slow = [model(ids1, slow_cache, cache_rows=rows).logits, model(ids3, slow_cache, cache_rows=rows).logits]
    for f, s in zip(fast, slow):
        assert_close(f, s, torch.float32, f"rows {rows}")
    assert fast_cache.lengths == slow_cache.lengths and fast_cache.next_pos == slow_cache.next_pos
    assert torch.equal(fast_cache.valid_BS, slow_cache.valid_BS)
    for r in rows:
        n = fast_cache.lengths[r]
        assert_close(fast_cache.k[:, r, :, :n], slow_cache.k[:, r, :, :n], torch.float32, f"row {r} keys")


@torch.no_grad()
def test_right_padded_chunks_of_several_rows_equal_each_prompt_alone(model):
    """Chunked prefill: three prompts prefilled 4 tokens per pass, right-padded to the pass's
    longest chunk (new_tokens), then decoded: every row equals its prompt alone."""
    n, chunk = 5, 4
    cache = KVCache.empty(model.cfg, 3, 40, "cpu", torch.float32)
    done = [0] * 3
    last = [None] * 3
    while any(d < len(p) for d, p in zip(done, PROMPTS)):
        rows = [r for r in range(3) if done[r] < len(PROMPTS[r])]
        parts = [PROMPTS[r][done[r]:done[r] + chunk] for r in rows]
        width = max(map(len, parts))
        ids = torch.tensor([p + [0] * (width - len(p)) for p in parts])
        logits = model(ids, cache, cache_rows=rows, new_tokens=[len(p) for p in parts], last_logits_only=True).logits
        for i, r in enumerate(rows):
            done[r] += len(parts[i])
            last[r] = logits[i, -1]
    assert cache.lengths == cache.next_pos == [len(p) for p in PROMPTS], "scratch tokens advanced a row"
    tokens = [[int(x.argmax())] for x in last]
    for _ in range(n - 1):
        logits = model(torch.tensor([[t[-1]] for t in tokens]), cache).logits[:, -1]
        for b in range(3):
            tokens[b].append(int(logits[b].argmax()))
    for b, p in enumerate(PROMPTS):
        assert tokens[b] == alone(model, p, n)[0], f"row {b}"
    padded = KVCache.empty(model.cfg, 2, 20, "cpu", torch.float32)
    ids, mask = left_pad(PROMPTS[:2])
    model(ids, padded, attention_mask_BS=mask)
    with pytest.raises(ValueError, match="new_tokens .*needs a KV cache whose rows hold no padding"):
        model(torch.tensor([[1, 2]]), padded, cache_rows=[1], new_tokens=[1])
    with pytest.raises(ValueError, match=r"new_tokens=\[3\] must give each of the 1 rows 1..2 real tokens"):
        model(torch.tensor([[1, 2]]), cache, cache_rows=[0], new_tokens=[3])


def test_stacked_qkv_inference_path_equals_the_three_projections_and_sees_weight_changes():
    """CPU inference runs q/k/v as one GEMM on a cached stacked weight: the same logits as the
    three projections (the gradient path), rebuilt when a weight changes in place or is replaced."""
    torch.manual_seed(0)
    m = MoETransformer(small_model(n_kv_heads=2, max_seq_len=48)).eval()
    x = torch.tensor([PROMPTS[0], PROMPTS[0][::-1]])
    for change in (lambda a: a.wq.weight.mul_(1.5), lambda a: setattr(a.wv, "weight", torch.nn.Parameter(a.wv.weight * 2))):
        with torch.no_grad():
            fused = m(x).logits
            change(m.blocks[0].attn)
            changed = m(x).logits
        assert not torch.equal(fused, changed), "the stacked weight was not rebuilt"
        assert torch.equal(changed, m(x).logits.detach())  # grad enabled: wq, wk, wv one by one
