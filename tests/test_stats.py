"""Balance, specialisation and layer-agreement metrics on constructed routings (hand-computed values)."""
import math

import pytest
import torch

from moe_runtime.core.stats import (balance_by_granularity, balance_metrics, domain_expert_counts, domain_specialisation,
                       domain_topk_share, layer_agreement, mutual_information_bits, per_domain_nmi,
                       plot_domain_expert_heatmaps, starved_experts, top_experts_per_domain)


# ---------------------------------------------------------------- balance
def test_micro_imbalance_that_cancels_over_the_global_batch():
    # Two micro-batches, each sends everything to a different expert: each micro-batch is as
    # unbalanced as 2 experts allow (max/mean 2, cv 1); their sum is perfectly balanced.
    m = torch.tensor([[[4, 0]], [[0, 4]]])  # [M=2, L=1, E=2]
    b = balance_by_granularity(m)
    assert b["micro_max_over_mean"] == pytest.approx(2.0) and b["micro_cv"] == pytest.approx(1.0)
    assert b["global_max_over_mean"] == pytest.approx(1.0) and b["global_cv"] == pytest.approx(0.0)
    assert b["micro_idle_fraction"] == pytest.approx(0.5) and b["global_idle_fraction"] == 0.0


def test_balance_by_granularity_hand_computed_per_layer_and_over_global_batches():
    # layer 0: micro [3,1,2] twice -> max/mean 3/2, cv sqrt(2/3)/2; global [6,2,4] has the same ratios.
    # layer 1: micro [2,2,2] (1, cv 0) and [0,0,6] (3, cv sqrt(8)/2) -> means 2 and sqrt(8)/4;
    #          global [2,2,8] -> max/mean 8/4 = 2, cv sqrt(8)/4.
    m = torch.tensor([[[3, 1, 2], [2, 2, 2]],
                      [[3, 1, 2], [0, 0, 6]]])  # [M=2, L=2, E=3]
    b = balance_by_granularity(m)
    cv0 = math.sqrt(2 / 3) / 2
    assert b["per_layer_micro_max_over_mean"] == pytest.approx([1.5, 2.0], abs=1e-4)
    assert b["per_layer_micro_cv"] == pytest.approx([cv0, (0 + math.sqrt(8) / 2) / 2], abs=1e-4)
    assert b["per_layer_global_max_over_mean"] == pytest.approx([1.5, 2.0], abs=1e-4)
    assert b["per_layer_global_cv"] == pytest.approx([cv0, math.sqrt(8) / 4], abs=1e-4)
    assert b["micro_max_over_mean"] == pytest.approx(1.75)
    # [G, M, L, E]: the statistics are averaged over global batches; a balanced second global batch halves the excess.
    g = torch.stack([m, torch.full_like(m, 2)])
    bg = balance_by_granularity(g)
    assert bg["global_max_over_mean"] == pytest.approx((1.75 + 1.0) / 2)
    # The global statistic of a single micro-batch is the micro statistic, and agrees with balance_metrics.
    one = balance_by_granularity(m[:1])
    assert one["global_max_over_mean"] == pytest.approx(one["micro_max_over_mean"])
    assert one["global_cv"] == pytest.approx(balance_metrics(m[0])["load_cv"])


def test_balance_by_granularity_refuses_wrong_rank():
    with pytest.raises(ValueError, match=r"expected \[M, L, E\] or \[G, M, L, E\]"):
        balance_by_granularity(torch.ones(3, 4))


def test_starved_experts_thresholds():
    c = torch.tensor([[10, 0, 1, 9], [5, 5, 5, 5]])  # fair share 5 per expert
    s = starved_experts(c, fraction=0.1)               # starved: < 0.5 tokens
    assert (s["idle_experts"], s["starved_experts"]) == (1, 1)
    assert s["per_layer_idle"] == [1, 0]
    s = starved_experts(c, fraction=0.25)              # starved: < 1.25 tokens
    assert (s["idle_experts"], s["starved_experts"]) == (1, 2) and s["per_layer_starved"] == [2, 0]


# ---------------------------------------------------------------- specialisation
def test_mutual_information_hand_computed():
    mi, hx, hy = mutual_information_bits(torch.tensor([[3, 1], [1, 3]]))
    h_quarter = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert (hx, hy) == (pytest.approx(1.0), pytest.approx(1.0))
    assert mi == pytest.approx(1.0 - h_quarter, abs=1e-12)


def test_domain_expert_counts_from_topk_and_labels():
    idx_LTK = torch.tensor([[[0, 1], [1, 2], [0, 2]]])  # L=1, T=3, K=2
    dom_T = torch.tensor([0, 1, 0])
    c = domain_expert_counts(idx_LTK, dom_T, num_domains=2, num_experts=3)
    assert c.tolist() == [[[2, 1, 1]], [[0, 1, 1]]]
    with pytest.raises(ValueError, match="routed tokens but 2 domain labels"):
        domain_expert_counts(idx_LTK, dom_T[:2], 2, 3)


def _specialised_routing(T: int, D: int, groups: list[list[int]], K: int, seed: int = 0):
    """Each domain routes only inside its own expert group (K distinct experts per token)."""
    g = torch.Generator().manual_seed(seed)
    dom = torch.randint(0, D, (T,), generator=g)
    idx = torch.stack([torch.tensor(groups[int(d)])[torch.randperm(len(groups[int(d)]), generator=g)[:K]]
                       for d in dom])
    return idx, dom


def test_perfectly_specialised_routing_scores_one():
    # Uneven groups: a domain may spread over several experts; NMI is 1 as long as no expert is shared.
    idx, dom = _specialised_routing(600, 3, [[0, 1], [2, 3, 4], [5, 6, 7]], K=2)
    c = domain_expert_counts([idx, idx], dom, 3, 8)
    s = domain_specialisation(c)
    assert s["nmi"] == pytest.approx(1.0, abs=1e-9)
    assert s["per_layer_nmi"] == [1.0, 1.0]
    # relabelling experts does not change it
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    assert domain_specialisation(c[:, :, perm])["nmi"] == pytest.approx(1.0, abs=1e-9)


def test_routing_independent_of_domain_scores_zero():
    # Exactly independent: joint counts are an outer product.
    exact = torch.outer(torch.tensor([1, 2, 3]), torch.tensor([5, 1, 0, 2, 7, 1, 1, 3]))[:, None, :] * 10
    assert domain_specialisation(exact)["nmi"] == pytest.approx(0.0, abs=1e-12)
    # Sampled independently: the plug-in estimate is only its small positive bias,
    # (D-1)(E-1)/(2 N ln2) = 8e-5 bits (NMI 5e-5) for N = 120k assignments, far below the tolerance.
    g = torch.Generator().manual_seed(0)
    T = 60_000
    idx = _random_topk(T, 8, 2, g)
    dom = torch.randint(0, 3, (T,), generator=g)
    nmi = domain_specialisation(domain_expert_counts([idx], dom, 3, 8))["nmi"]
    assert 0.0 <= nmi < 2e-3


def test_partial_specialisation_is_between_and_hand_computed():
    c = torch.tensor([[3, 1], [1, 3]])[:, None, :]  # D=2, L=1, E=2; H(D) = 1 bit
    h_quarter = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    s = domain_specialisation(c)
    assert s["nmi"] == pytest.approx(1.0 - h_quarter, abs=1e-12)
    assert s["per_layer_mi_bits"] == [pytest.approx(1.0 - h_quarter, abs=1e-4)]


def test_specialisation_needs_two_domains():
    with pytest.raises(ValueError, match="single domain"):
        domain_specialisation(torch.tensor([[[3, 4, 5]], [[0, 0, 0]]]))
    with pytest.raises(ValueError, match=r"expected \[D, L, E\]"):
        domain_specialisation(torch.ones(2, 3))


def test_top_experts_per_domain():
    c = torch.tensor([[[6, 1, 3, 0]], [[0, 0, 1, 9]]])  # D=2, L=1, E=4
    top = top_experts_per_domain(c, n=2)
    assert top == [[[(0, 0.6), (2, 0.3)], [(3, 0.9), (2, 0.1)]]]


# ---------------------------------------------------------------- agreement across layers
def _random_topk(T: int, E: int, K: int, g: torch.Generator) -> torch.Tensor:
    """[T, K] K distinct uniformly random experts per token."""
    return torch.rand(T, E, generator=g).topk(K, dim=1).indices


def test_fixed_mapping_between_layers_is_fully_predictable():
    g = torch.Generator().manual_seed(0)
    T, E, K = 4000, 8, 2
    first = _random_topk(T, E, K, g)
    perm = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    a = layer_agreement(torch.stack([first, perm[first], first]), E)
    assert [p["layers"] for p in a["pairs"]] == [[0, 1], [1, 2]]
    assert a["top1_nmi"] == pytest.approx(1.0, abs=1e-9)
    assert a["table_hit_rate"] == pytest.approx(1.0)
    assert a["popular_hit_rate"] == pytest.approx(K / E, abs=0.03)  # uniform load: history is all there is


def test_independent_layers_are_not_predictable():
    g = torch.Generator().manual_seed(1)
    T, E, K = 6000, 8, 2
    idx = torch.stack([_random_topk(T, E, K, g), _random_topk(T, E, K, g)])
    a = layer_agreement(idx, E)
    assert a["top1_nmi"] < 0.01
    assert a["table_hit_rate"] == pytest.approx(K / E, abs=0.03)
    assert a["popular_hit_rate"] == pytest.approx(K / E, abs=0.03)


def test_skewed_but_independent_layers_match_the_popular_baseline():
    # Layer 1 always uses experts {6, 7} whatever layer 0 did: popularity alone predicts it perfectly.
    g = torch.Generator().manual_seed(2)
    first = _random_topk(500, 8, 2, g)
    second = torch.tensor([[6, 7]]).repeat(500, 1)
    a = layer_agreement([first, second], 8)
    assert a["table_hit_rate"] == pytest.approx(1.0) and a["popular_hit_rate"] == pytest.approx(1.0)


def test_layer_agreement_errors():
    with pytest.raises(ValueError, match="at least 2 MoE layers"):
        layer_agreement(torch.zeros(1, 5, 2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="must match"):
        layer_agreement([torch.zeros(5, 2, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long)], 4)


def test_heatmap_figure_is_written(tmp_path):
    c = torch.tensor([[[6, 1, 3, 0], [1, 1, 1, 1]], [[0, 0, 1, 9], [2, 0, 0, 2]]])
    p = plot_domain_expert_heatmaps({"micro": c, "global": c.flip(-1)}, ["a", "b"], tmp_path / "f" / "h.png", "t")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- per-domain top-k share and one-vs-rest NMI
def test_topk_share_and_per_domain_nmi_on_a_hand_made_routing_table():
    # 6 tokens, top-2 of E=4, one layer. Domain 0 (tokens 0-2) always picks {0, 1}; domain 1
    # (tokens 3-5) picks {2, 3}, {2, 3}, {0, 2}.
    idx = torch.tensor([[0, 1], [1, 0], [0, 1], [2, 3], [3, 2], [0, 2]])
    dom = torch.tensor([0, 0, 0, 1, 1, 1])
    c = domain_expert_counts([idx], dom, 2, 4)
    assert c[:, 0].tolist() == [[3, 3, 0, 0], [1, 0, 3, 2]]
    share = domain_topk_share(c, k=2)
    # domain 0: all 6 assignments on experts 0 and 1; domain 1: 3 + 2 of its 6 on experts 2 and 3
    assert share["per_domain"] == [pytest.approx(1.0), pytest.approx(5 / 6)]
    assert share["mean"] == pytest.approx((1 + 5 / 6) / 2) and share["uniform"] == 0.5
    assert domain_topk_share(c, k=1)["per_domain"] == [pytest.approx(0.5), pytest.approx(0.5)]
    # With two domains one-vs-rest equals the two-domain NMI: I(D; E) / H(D), by hand from the joint /12.
    p = [[3, 3, 0, 0], [1, 0, 3, 2]]
    pe = [sum(col) / 12 for col in zip(*p)]
    mi = sum(v / 12 * math.log2((v / 12) / (0.5 * pe[e])) for row in p for e, v in enumerate(row) if v)
    nmi = per_domain_nmi(c)["per_domain"]
    assert nmi == [pytest.approx(mi), pytest.approx(mi)]
    assert domain_specialisation(c)["nmi"] == pytest.approx(mi)


def test_per_domain_nmi_one_vs_rest_with_three_domains():
    # Domain 0 owns expert 0 alone; domains 1 and 2 share experts 1 and 2 identically.
    c = torch.tensor([[4, 0, 0], [0, 2, 2], [0, 2, 2]])[:, None, :]
    nmi = per_domain_nmi(c)
    assert nmi["per_domain"][0] == pytest.approx(1.0)  # knowing the expert tells "domain 0 or not" exactly
    # domain 1 vs rest: the joint over (is-1, expert) is [[0, 2, 2], [4, 2, 2]] / 12
    j = [[0, 2, 2], [4, 2, 2]]
    px, pe = [sum(r) / 12 for r in j], [sum(col) / 12 for col in zip(*j)]
    mi = sum(v / 12 * math.log2((v / 12) / (px[x] * pe[e])) for x, r in enumerate(j) for e, v in enumerate(r) if v)
    hx = -sum(q * math.log2(q) for q in px)
    assert nmi["per_domain"][1] == pytest.approx(mi / hx) and nmi["per_domain"][2] == pytest.approx(mi / hx)
    # uniform routing: zero for every domain; a perfectly specialised table: one for every domain
    assert per_domain_nmi(torch.ones(3, 2, 4))["per_domain"] == [pytest.approx(0.0, abs=1e-12)] * 3
    assert per_domain_nmi(torch.eye(3)[:, None, :].repeat(1, 2, 1) * 5)["per_domain"] == [pytest.approx(1.0)] * 3
    share = domain_topk_share(c, k=1)
    assert share["per_domain"] == [pytest.approx(1.0), pytest.approx(0.5), pytest.approx(0.5)]
    with pytest.raises(ValueError, match="k=4"):
        domain_topk_share(c, k=4)
    with pytest.raises(ValueError, match=r"expected \[D, L, E\]"):
        per_domain_nmi(torch.ones(2, 3))
