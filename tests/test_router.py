import math

import pytest
import torch

from moe_runtime.core.router import BalanceTracker, TopKRouter, balance_loss
from tests.helpers import assert_close, small_moe


def _router(score_func="softmax", norm=True, E=6, K=2, D=8, **kw):
    torch.manual_seed(0)
    cfg = small_moe(num_experts=E, top_k=K, score_func=score_func, norm_topk_prob=norm, **kw)
    return TopKRouter(D, cfg, init_std=0.5), cfg


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("norm", [True, False])
def test_router_matches_float64_hand_computation(score_func, norm):
    r, cfg = _router(score_func, norm)
    x = torch.randn(10, 8)
    out = r(x)
    logits = x.double() @ r.weight_ED.double().T
    scores = (logits.softmax(-1) if score_func == "softmax" else logits.sigmoid()).detach()
    for t in range(10):
        order = sorted(range(6), key=lambda e: -float(scores[t, e]))[:2]
        assert out.topk_idx_TK[t].tolist() == order
        w = scores[t, order]
        if norm:
            w = w / w.sum()
        assert_close(out.topk_w_TK[t].double(), w, torch.float32, "topk weights")
    probs = scores if score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
    assert_close(out.probs_mean_E.double(), probs.mean(0), torch.float32, "mean probs")
    assert out.counts_E.tolist() == torch.bincount(out.topk_idx_TK.flatten(), minlength=6).tolist()
    z = (torch.logsumexp(logits, -1) ** 2).mean()
    assert_close(out.z_loss.double(), z, torch.float32, "z loss")


def test_balance_loss_hand_computation_and_uniform_is_one():
    probs = torch.tensor([[0.5, 0.25, 0.25, 0.0]], dtype=torch.float64)
    counts = torch.tensor([[3, 1, 0, 0]])
    # N_E * sum f_i p_i = 4 * (0.75*0.5 + 0.25*0.25) = 1.75
    assert math.isclose(float(balance_loss(probs, counts)), 1.75, rel_tol=1e-12)
    uni = torch.full((2, 8), 1 / 8)
    assert math.isclose(float(balance_loss(uni, torch.full((2, 8), 5))), 1.0, rel_tol=1e-6)


def test_aux_free_bias_changes_selection_not_weights():
    r, _ = _router(aux_free_bias=True, bias_update_rate=10.0)
    x = torch.randn(32, 8)
    before = r(x)
    r.update_bias(before.counts_E)
    after = r(x)
    busiest = int(before.counts_E.argmax())
    assert after.counts_E[busiest] < before.counts_E[busiest]
    # combine weights are still the raw scores of the selected experts (renormalised)
    scores = (x @ r.weight_ED.T).softmax(-1)
    w = scores.gather(1, after.topk_idx_TK)
    assert_close(after.topk_w_TK, w / w.sum(-1, keepdim=True), torch.float32, "weights without bias")


def _micro_batches(n=3, T=12, D=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, D, generator=g) for _ in range(n)]


def _grad_of(r, fn):
    r.zero_grad()
    fn().backward()
    return r.weight_ED.grad.clone()


def test_global_batch_exact_equals_full_batch_loss_and_gradient():
    """Exact global-batch semantics: accumulating micro-batches gives the loss and gradient
    of the balance loss computed on the concatenated global batch in one go."""
    r, cfg = _router(balance_scope="global_batch", global_sync="exact")
    mbs = _micro_batches()
    full = torch.cat(mbs)

    def one_pass():
        o = r(full)
        return balance_loss(o.probs_mean_E[None], o.counts_E[None])

    g_full = _grad_of(r, one_pass)
    loss_full = float(one_pass())

    tracker = BalanceTracker(cfg, 1)
    with torch.no_grad():
        pre = sum(r(x).counts_E for x in mbs)[None]
    tracker.begin_step(pre)
    r.zero_grad()
    total = 0.0
    for x in mbs:
        lbl, _ = tracker.losses([r(x)])
        (lbl / len(mbs)).backward()
        total += float(lbl) / len(mbs)
    assert torch.equal(tracker.end_step(), pre), "f_i must be the whole step's counts"
    assert math.isclose(total, loss_full, rel_tol=1e-6)
    assert_close(r.weight_ED.grad, g_full, torch.float32, "router grad")


def test_micro_batch_scope_uses_local_counts():
    r, cfg = _router(balance_scope="micro_batch")
    tracker = BalanceTracker(cfg, 1)
    tracker.begin_step()
    for x in _micro_batches():
        o = r(x)
        lbl, _ = tracker.losses([o])
        assert math.isclose(float(lbl), float(balance_loss(o.probs_mean_E[None], o.counts_E[None])), rel_tol=1e-6)


def test_cumulative_scope_counts_grow_over_the_step():
    r, cfg = _router(balance_scope="global_batch", global_sync="cumulative")
    tracker = BalanceTracker(cfg, 1)
    tracker.begin_step()
    mbs, seen = _micro_batches(), None
    for x in mbs:
        o = r(x)
        seen = o.counts_E[None] if seen is None else seen + o.counts_E[None]
        lbl, _ = tracker.losses([o])
        assert math.isclose(float(lbl), float(balance_loss(o.probs_mean_E[None], seen)), rel_tol=1e-6)
    with torch.no_grad():
        assert torch.equal(tracker.end_step(), sum(r(x).counts_E for x in mbs)[None])


def test_exact_mode_without_prepass_is_refused():
    _, cfg = _router(balance_scope="global_batch", global_sync="exact")
    with pytest.raises(RuntimeError, match="needs the step's counts"):
        BalanceTracker(cfg, 1).begin_step()


def test_reducer_called_once_per_micro_batch_for_all_layers():
    r, cfg = _router(balance_scope="global_batch", global_sync="cumulative")
    calls = []

    def reduce(c):
        calls.append(tuple(c.shape))
        return c * 2  # pretend a second rank saw the same counts

    tracker = BalanceTracker(cfg, 3, reduce=reduce)
    tracker.begin_step()
    x = _micro_batches(1)[0]
    outs = [r(x), r(x), r(x)]
    tracker.losses(outs)
    assert calls == [(3, 6)]


def test_statistics_under_no_grad_are_computed_when_read_and_equal():
    """Inference skips the load counts, mean probabilities and z-loss until someone reads them
    (a decode step reads none); when read they equal the eager values."""
    torch.manual_seed(0)
    router = TopKRouter(16, small_moe(num_experts=6, top_k=2))
    x = torch.randn(9, 16)
    eager = router(x)
    with torch.no_grad():
        lazy = router(x)
        assert "counts_E" not in vars(lazy) and "z_loss" not in vars(lazy)
        assert torch.equal(lazy.topk_idx_TK, eager.topk_idx_TK)
        assert torch.equal(lazy.counts_E, eager.counts_E)
        assert_close(lazy.probs_mean_E, eager.probs_mean_E.detach(), torch.float32, "probs_mean_E")
        assert_close(lazy.z_loss, eager.z_loss.detach(), torch.float32, "z_loss")
        assert "counts_E" in vars(lazy)
    with pytest.raises(AttributeError):
        lazy.no_such_field
