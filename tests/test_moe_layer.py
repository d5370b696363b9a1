import pytest
import torch

from moe_runtime import kernels
from moe_runtime.kernels.reference import grouped_mlp_reference, per_token_moe_reference
from moe_runtime.core.dispatch import LocalDispatcher
from moe_runtime.core.experts import ExpertBank, dense_from_single_expert
from moe_runtime.core.layer import MoELayer
from moe_runtime.core.model import MoETransformer
from moe_runtime.core.router import RouterOutput
from tests.helpers import assert_close, small_model, small_moe


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    return MoELayer(16, small_moe(**kw), init_std=0.3)


def _routing(idx_TK, w_TK, E):
    return RouterOutput(idx_TK, w_TK, torch.bincount(idx_TK.flatten(), minlength=E), torch.zeros(E), torch.zeros(()))


def test_one_expert_top1_equals_dense_swiglu():
    layer = _layer(num_experts=1, top_k=1)
    dense = dense_from_single_expert(layer.experts)
    x = torch.randn(9, 16)
    y, _ = layer(x)
    assert_close(y, dense(x), torch.float32, "E=1 vs dense")


@pytest.mark.parametrize("E,K", [(4, 1), (4, 2), (6, 6), (8, 3)])
def test_dropless_matches_per_token_loop_forward_and_grads(E, K):
    layer = _layer(num_experts=E, top_k=K)
    x = torch.randn(11, 16, requires_grad=True)
    y, r = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = [x.grad.clone(), layer.experts.w13_EDF2.grad.clone(), layer.experts.w2_EFD.grad.clone(),
             layer.router.weight_ED.grad.clone()]

    x2 = x.detach().clone().requires_grad_()
    w13 = layer.experts.w13_EDF2.detach().clone().requires_grad_()
    w2 = layer.experts.w2_EFD.detach().clone().requires_grad_()
    wr = layer.router.weight_ED.detach().clone().requires_grad_()
    scores = (x2 @ wr.T).softmax(-1)
    idx = scores.detach().topk(K, -1).indices
    w = scores.gather(1, idx)
    w = w / w.sum(-1, keepdim=True)
    assert torch.equal(idx, r.topk_idx_TK)
    y2 = per_token_moe_reference(x2, idx, w, w13, w2)
    (y2 * g).sum().backward()
    assert_close(y, y2, torch.float32, "output")
    for a, b, what in zip(grads, [x2.grad, w13.grad, w2.grad, wr.grad], ["dx", "dw13", "dw2", "drouter"]):
        assert_close(a, b, torch.float32, what)


def test_zero_token_experts_and_all_tokens_on_one_expert():
    layer = _layer(num_experts=5, top_k=1)
    x = torch.randn(7, 16, requires_grad=True)
    idx = torch.full((7, 1), 3)
    w = torch.ones(7, 1)
    y, _ = layer(x, _routing(idx, w, 5))
    y.sum().backward()
    expected = per_token_moe_reference(x.detach(), idx, w, layer.experts.w13_EDF2.detach(), layer.experts.w2_EFD.detach())
    assert_close(y, expected, torch.float32, "all on expert 3")
    g13 = layer.experts.w13_EDF2.grad
    assert torch.count_nonzero(g13[[0, 1, 2, 4]]) == 0 and torch.count_nonzero(g13[3]) > 0


def test_grouped_mlp_reference_empty_and_sizes():
    E, D, F = 4, 8, 6
    w13, w2 = torch.randn(E, D, 2 * F), torch.randn(E, F, D)
    y = grouped_mlp_reference(torch.zeros(0, D), w13, w2, torch.zeros(E, dtype=torch.long))
    assert y.shape == (0, D)
    x = torch.randn(5, D)
    counts = torch.tensor([0, 5, 0, 0])
    assert_close(kernels.grouped_mlp(x, w13, w2, counts), per_token_moe_reference(
        x, torch.ones(5, 1, dtype=torch.long), torch.ones(5, 1), w13, w2), torch.float32, "one expert")


def test_capacity_factor_drops_and_reports_rate():
    d = LocalDispatcher(4, capacity_factor=1.0)
    x = torch.randn(8, 3)
    idx = torch.tensor([[0], [0], [0], [0], [0], [1], [2], [3]])
    xs, counts, meta = d.dispatch(x, idx, torch.ones(8, 1))
    assert counts.tolist() == [2, 1, 1, 1]  # capacity = ceil(1.0 * 8 / 4) = 2
    assert meta.dropped == 3 and d.last_drop_rate == pytest.approx(3 / 8)
    assert meta.token_idx_N.tolist() == [0, 1, 5, 6, 7]  # the first tokens of expert 0 are kept
    out = d.combine(xs, meta)
    assert torch.equal(out[2:5], torch.zeros(3, 3))


def test_shared_expert_with_gate_adds_gated_dense_path():
    layer = _layer(num_experts=4, top_k=2, num_shared_experts=1, d_shared_expert=20, shared_expert_gate=True)
    x = torch.randn(6, 16)
    y, r = layer(x)
    routed = per_token_moe_reference(x, r.topk_idx_TK, r.topk_w_TK, layer.experts.w13_EDF2, layer.experts.w2_EFD)
    expected = routed + torch.sigmoid(layer.shared_gate(x)) * layer.shared(x)
    assert_close(y, expected, torch.float32, "shared + routed")


def test_pre_attention_router_routes_from_block_input():
    cfg = small_model(small_moe(router_position="pre_attention"))
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    tokens = torch.randint(0, 256, (2, 8))
    out = model(tokens)
    block = model.blocks[0]
    h = model.embed(tokens)
    expected = block.ffn.route(block.attn_norm(h).reshape(16, -1))
    assert torch.equal(out.routing[0].topk_idx_TK, expected.topk_idx_TK)


def test_kv_cache_decode_matches_full_forward():
    torch.manual_seed(0)
    model = MoETransformer(small_model(n_kv_heads=2))
    tokens = torch.randint(0, 256, (2, 10))
    full = model(tokens).logits
    from moe_runtime.core.model import KVCache
    cache = KVCache.empty(model.cfg, 2, 10, "cpu", torch.float32)
    parts = [model(tokens[:, :6], cache).logits] + [model(tokens[:, i:i + 1], cache).logits for i in range(6, 10)]
    assert_close(torch.cat(parts, 1), full, torch.float32, "cached decode")


def test_expert_bank_forward_uses_kernels_entry():
    bank = ExpertBank(3, 8, 4)
    x = torch.randn(6, 8)
    counts = torch.tensor([2, 0, 4])
    assert_close(bank(x, counts), grouped_mlp_reference(x, bank.w13_EDF2, bank.w2_EFD, counts), torch.float32, "bank")


def test_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS", "fast")
    with pytest.raises(ValueError, match="MOE_KERNELS='fast' is not one of"):
        kernels.backend_for(torch.device("cpu"))
    monkeypatch.setenv("MOE_KERNELS", "reference")
    assert kernels.backend_for(torch.device("cpu")) == "reference"


def test_auto_backend_falls_back_once_when_triton_fails(monkeypatch):
    import moe_runtime.kernels.grouped_gemm as gg

    def broken(*a, **k):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(kernels, "_fallen_back", {})
    monkeypatch.setattr(kernels, "backend_for", lambda device: "triton")
    monkeypatch.setattr(gg, "grouped_mlp_triton", broken)
    monkeypatch.delenv("MOE_KERNELS", raising=False)
    E, D, F = 3, 8, 4
    x, w13, w2, counts = torch.randn(5, D), torch.randn(E, D, 2 * F), torch.randn(E, F, D), torch.tensor([2, 0, 3])
    with pytest.warns(RuntimeWarning, match="grouped_mlp: the Triton kernel failed .*out of resources"):
        y = kernels.grouped_mlp(x, w13, w2, counts)
    assert_close(y, grouped_mlp_reference(x, w13, w2, counts), torch.float32, "fallback")
    assert "grouped_mlp" in kernels._fallen_back
    kernels.grouped_mlp(x, w13, w2, counts)  # no second warning, no second attempt
    monkeypatch.setattr(kernels, "_fallen_back", {})
    monkeypatch.setenv("MOE_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="out of resources"):
        kernels.grouped_mlp(x, w13, w2, counts)


@pytest.mark.parametrize("T", [1, 7, 64, 65])
def test_sort_combine_equals_unpermute_forward_and_gradient(T):
    """Up to 64 tokens the CPU combine sorts rows back and weight-sums them with a batched matmul
    (no index_add); above, kernels.unpermute. Same output and gradients in x and the weights."""
    from moe_runtime.core import dispatch as D
    torch.manual_seed(T)
    d = LocalDispatcher(8)
    x = torch.randn(T, 16, requires_grad=True)
    w = torch.rand(T, 2, requires_grad=True)
    idx = torch.stack([torch.randperm(8)[:2] for _ in range(T)])
    xs, _, meta = d.dispatch(x, idx, w)
    assert (meta.order_N is not None) == (T <= D.SORT_COMBINE_MAX_TOKENS)
    y = torch.tanh(xs) * 3
    got = d.combine(y, meta)
    ref = y.new_zeros(T, 16).index_add(0, meta.token_idx_N, y * meta.weight_N[:, None])
    assert_close(got, ref, torch.float32, "combine")
    g_got = torch.autograd.grad((got * torch.arange(16.0)).sum(), (x, w), retain_graph=True)
    g_ref = torch.autograd.grad((ref * torch.arange(16.0)).sum(), (x, w))
    for a, b, name in zip(g_got, g_ref, ("dx", "dw")):
        assert_close(a, b, torch.float32, name)
