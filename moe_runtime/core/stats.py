"""Expert load and balance metrics, and the layers x experts load heatmap.

Legend: L MoE layers, E experts.
"""
from __future__ import annotations

from pathlib import Path

import torch


def balance_metrics(counts_LE: torch.Tensor) -> dict[str, object]:
    """Per-layer and mean balance of routed assignments.

    max_over_mean: load of the busiest expert over the mean load (1.0 = perfect; the busiest
    expert sets the step time in expert parallelism). cv: coefficient of variation of the loads.
    idle: experts that received no token.
    """
    c = counts_LE.double()
    mean = c.mean(dim=-1).clamp_min(1e-12)
    max_over_mean = c.max(dim=-1).values / mean
    cv = c.std(dim=-1, unbiased=False) / mean
    idle = (counts_LE == 0).sum(dim=-1)
    return {
        "load_max_over_mean": float(max_over_mean.mean()),
        "load_cv": float(cv.mean()),
        "idle_experts": int(idle.sum()),
        "per_layer_max_over_mean": [round(float(v), 4) for v in max_over_mean],
        "per_layer_cv": [round(float(v), 4) for v in cv],
    }


def plot_expert_load(counts_LE: torch.Tensor, path: str | Path, title: str = "expert load") -> Path:
    """Heatmap of each layer's share of routed tokens per expert (row-normalised)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = counts_LE.double() / counts_LE.double().sum(dim=-1, keepdim=True).clamp_min(1)
    L, E = share.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * E + 2), max(2.5, 0.35 * L + 1.5)))
    im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{title} (uniform = {1 / E:.3f})")
    fig.colorbar(im, ax=ax, label="share of tokens")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- balance at two granularities
# More legend: M micro-batches per global batch, G global batches, D domains, T tokens, K top-k.

def _imbalance(c_XE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max/mean, coefficient of variation) over the last dim; an all-zero row gives (0, 0)."""
    mean = c_XE.mean(dim=-1)
    safe = mean.clamp_min(1e-12)
    return c_XE.max(dim=-1).values / safe, c_XE.std(dim=-1, unbiased=False) / safe


def balance_by_granularity(micro_counts: torch.Tensor) -> dict[str, object]:
    """Expert load balance seen by one micro-batch and by the whole global batch.

    micro_counts: [M, L, E] assignments per expert in each of the M micro-batches of one global
    batch (one optimizer step), or [G, M, L, E] for G global batches. For each layer:
      micro_*  = the statistic of each micro-batch's own counts, averaged over the G*M micro-batches;
      global_* = the statistic of the counts summed over the M micro-batches, averaged over G.
    Statistics: max_over_mean (busiest expert / mean load, 1 = perfect) and cv (std / mean,
    population std, 0 = perfect). Micro-batch LBL drives micro_* towards perfect; global-batch LBL
    only constrains global_*, so micro_* may stay high while global_* is balanced.
    """
    c = micro_counts.double()
    if c.ndim == 3:
        c = c[None]
    if c.ndim != 4:
        raise ValueError(f"micro_counts has shape {tuple(micro_counts.shape)}; expected [M, L, E] or [G, M, L, E]")
    mom_m, cv_m = _imbalance(c)            # [G, M, L]
    mom_g, cv_g = _imbalance(c.sum(dim=1))  # [G, L]
    per = {"micro_max_over_mean": mom_m.mean(dim=(0, 1)), "micro_cv": cv_m.mean(dim=(0, 1)),
           "global_max_over_mean": mom_g.mean(dim=0), "global_cv": cv_g.mean(dim=0)}
    out: dict[str, object] = {k: float(v.mean()) for k, v in per.items()}
    out.update({f"per_layer_{k}": [round(float(x), 4) for x in v] for k, v in per.items()})
    out["micro_idle_fraction"] = float((c == 0).double().mean())
    out["global_idle_fraction"] = float((c.sum(dim=1) == 0).double().mean())
    return out


def starved_experts(counts_LE: torch.Tensor, fraction: float = 0.1) -> dict[str, object]:
    """Experts that (almost) never receive tokens: idle = 0 assignments; starved = fewer than
    `fraction` of the fair share (total / E) of their layer. Idle experts count as starved."""
    c = counts_LE.double()
    fair = c.sum(dim=-1, keepdim=True) / c.shape[-1]
    idle = (c == 0).sum(dim=-1)
    starved = (c < fraction * fair).sum(dim=-1)
    return {"idle_experts": int(idle.sum()), "starved_experts": int(starved.sum()),
            "per_layer_idle": idle.tolist(), "per_layer_starved": starved.tolist(), "starved_fraction": fraction}


# ---------------------------------------------------------------- domain specialisation
def domain_expert_counts(topk_idx_LTK: torch.Tensor | list[torch.Tensor], domain_T: torch.Tensor,
                         num_domains: int, num_experts: int) -> torch.Tensor:
    """[D, L, E] routed assignments of each domain's tokens to each expert.

    topk_idx_LTK: [L, T, K] (or a list of L [T, K]) expert ids; domain_T: [T] domain id of each token.
    """
    out = torch.zeros(num_domains, len(topk_idx_LTK), num_experts, dtype=torch.long)
    dom = domain_T.reshape(-1).long().cpu()
    for layer, idx_TK in enumerate(topk_idx_LTK):
        idx_TK = idx_TK.long().cpu()
        if idx_TK.shape[0] != dom.shape[0]:
            raise ValueError(f"layer {layer}: {idx_TK.shape[0]} routed tokens but {dom.shape[0]} domain labels")
        flat = (dom[:, None] * num_experts + idx_TK).reshape(-1)
        out[:, layer] = torch.bincount(flat, minlength=num_domains * num_experts).view(num_domains, num_experts)
    return out


def _entropy_bits(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def mutual_information_bits(joint_XY: torch.Tensor) -> tuple[float, float, float]:
    """(I(X;Y), H(X), H(Y)) in bits of the plug-in distribution joint / joint.sum() (counts in, any dtype)."""
    p = joint_XY.double() / joint_XY.double().sum().clamp_min(1e-300)
    hx, hy = _entropy_bits(p.sum(dim=1)), _entropy_bits(p.sum(dim=0))
    mi = hx + hy - _entropy_bits(p.reshape(-1))
    return max(0.0, mi), hx, hy


def domain_specialisation(counts_DLE: torch.Tensor) -> dict[str, object]:
    """Normalised mutual information between a token's domain and the experts it is routed to.

    The joint distribution is over routed assignments: each token contributes its K (domain,
    expert) pairs, so P(d, e) = counts[d, l, e] / sum. Per layer,
        nmi = I(D; E) / H(D)
    = the fraction of the uncertainty about the domain that is removed by knowing which expert
    an assignment went to. It is 1 when every expert serves a single domain (perfectly
    specialised; with E >= D this is attainable even when a domain spreads over several experts),
    0 when routing is independent of the domain, and lies in [0, 1] in between (I <= H(D)).
    Plug-in estimate: for N assignments its upward bias is about (D-1)(E-1) / (2 N ln 2) bits,
    e.g. 0.0009 of H(D) for D=3, E=8, N=16k.
    """
    if counts_DLE.ndim != 3:
        raise ValueError(f"counts_DLE has shape {tuple(counts_DLE.shape)}; expected [D, L, E]")
    nmi, mi_bits = [], []
    for layer in range(counts_DLE.shape[1]):
        mi, h_dom, _ = mutual_information_bits(counts_DLE[:, layer])
        if h_dom <= 0:
            raise ValueError(f"layer {layer}: the counts hold a single domain (H(D)=0); specialisation needs "
                             f"tokens from at least two domains")
        nmi.append(mi / h_dom)
        mi_bits.append(mi)
    return {"nmi": sum(nmi) / len(nmi), "per_layer_nmi": [round(v, 4) for v in nmi],
            "per_layer_mi_bits": [round(v, 4) for v in mi_bits]}


def top_experts_per_domain(counts_DLE: torch.Tensor, n: int = 2) -> list[list[list[tuple[int, float]]]]:
    """[layer][domain] -> the n experts taking the largest share of that domain's assignments,
    as (expert, share); share in [0, 1] is a fraction of the domain's assignments (uniform = 1/E)."""
    share = counts_DLE.double() / counts_DLE.double().sum(dim=-1, keepdim=True).clamp_min(1)
    D, L, E = share.shape
    vals, idx = share.topk(min(n, E), dim=-1)
    return [[[(int(idx[d, layer, j]), round(float(vals[d, layer, j]), 4)) for j in range(idx.shape[-1])]
             for d in range(D)] for layer in range(L)]


# ---------------------------------------------------------------- router agreement across layers
def _multi_hot(idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    out = torch.zeros(idx_TK.shape[0], num_experts, dtype=torch.float64)
    return out.scatter_(1, idx_TK.long(), 1.0)


def layer_agreement(topk_idx_LTK: torch.Tensor | list[torch.Tensor], num_experts: int) -> dict[str, object]:
    """How predictable layer l+1's experts are from layer l's, for each neighbouring pair.

    topk_idx_LTK: [L, T, K] (or a list of L [T, K]) expert ids of the same T tokens, column 0 the
    top-1 choice. For the pair (l, l+1):
      top1_nmi: I(A; B) / H(B) with A, B the top-1 experts of a token at l and l+1: the fraction of
        the uncertainty about l+1's first choice that l's first choice removes (1 = a fixed mapping,
        0 = independent). Expert ids are arbitrary per layer, so "same id" agreement means nothing;
        this is invariant to relabelling.
      table_hit_rate: a transition-table predictor, the kind an offload prefetcher can use. Fit on
        the even-indexed tokens: P(b | a) from counts of (a in S_l, b in S_l+1); on each odd-indexed
        token predict the K experts with the largest sum over a in S_l(t) of P(b | a) and score
        |predicted & S_l+1(t)| / K. Averaged over odd tokens.
      popular_hit_rate: the same score for always predicting the K experts most used at l+1 on the
        even tokens (the no-information baseline); table minus popular is what routing history adds.
    """
    L = len(topk_idx_LTK)
    if L < 2:
        raise ValueError(f"layer agreement needs at least 2 MoE layers; got {L}")
    pairs = []
    for layer in range(L - 1):
        a_TK, b_TK = topk_idx_LTK[layer].long().cpu(), topk_idx_LTK[layer + 1].long().cpu()
        if a_TK.shape != b_TK.shape or a_TK.shape[0] < 2:
            raise ValueError(f"layers {layer} and {layer + 1}: routing shapes {tuple(a_TK.shape)} and "
                             f"{tuple(b_TK.shape)} must match and hold at least 2 tokens")
        K = a_TK.shape[1]
        joint = torch.bincount(a_TK[:, 0] * num_experts + b_TK[:, 0],
                               minlength=num_experts * num_experts).view(num_experts, num_experts)
        mi, _, h_b = mutual_information_bits(joint)
        A, B = _multi_hot(a_TK, num_experts), _multi_hot(b_TK, num_experts)
        fit, ev = slice(0, None, 2), slice(1, None, 2)
        trans_EE = A[fit].T @ B[fit]
        cond_EE = trans_EE / trans_EE.sum(dim=1, keepdim=True).clamp_min(1)
        pred = (A[ev] @ cond_EE).topk(K, dim=1).indices
        table = float(B[ev].gather(1, pred).sum(dim=1).mean()) / K
        popular = B[fit].sum(dim=0).topk(K).indices
        pop = float(B[ev][:, popular].sum(dim=1).mean()) / K
        pairs.append({"layers": [layer, layer + 1], "top1_nmi": round(mi / h_b, 4) if h_b > 0 else 1.0,
                      "table_hit_rate": round(table, 4), "popular_hit_rate": round(pop, 4)})
    mean = lambda k: sum(p[k] for p in pairs) / len(pairs)  # noqa: E731
    return {"top1_nmi": mean("top1_nmi"), "table_hit_rate": mean("table_hit_rate"),
            "popular_hit_rate": mean("popular_hit_rate"), "pairs": pairs}


def plot_domain_expert_heatmaps(panels: dict[str, torch.Tensor], domains: list[str] | tuple[str, ...],
                                path: str | Path, title: str = "") -> Path:
    """Side-by-side domain x expert heatmaps, one column per panel and one row per MoE layer.

    panels: name -> counts [D, L, E]. Each cell is the share of the domain's assignments that go
    to the expert (rows sum to 1; uniform routing = 1/E everywhere); the layer's NMI is in its title.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    D, L, E = next(iter(panels.values())).shape
    shares = {k: v.double() / v.double().sum(dim=-1, keepdim=True).clamp_min(1) for k, v in panels.items()}
    vmax = max(float(s.max()) for s in shares.values())
    fig, axes = plt.subplots(L, len(names), figsize=(1.6 + 0.45 * E * len(names), 0.6 + (0.35 * D + 0.8) * L),
                             squeeze=False, gridspec_kw={"hspace": 0.45, "wspace": 0.08})
    for col, name in enumerate(names):
        nmi = domain_specialisation(panels[name])["per_layer_nmi"]
        for layer in range(L):
            ax = axes[layer][col]
            im = ax.imshow(shares[name][:, layer].numpy(), aspect="auto", cmap="magma", vmin=0, vmax=vmax)
            ax.set_yticks(range(D), list(domains) if col == 0 else [])
            ax.set_xticks(range(E), [str(e) for e in range(E)] if layer == L - 1 else [])
            ax.set_title(f"{name}: layer {layer}, NMI {nmi[layer]:.3f}", fontsize=9)
            if layer == L - 1:
                ax.set_xlabel("expert")
    fig.colorbar(im, ax=axes, label=f"share of the domain's assignments (uniform = {1 / E:.3f})", shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------- per-domain specialisation
def domain_topk_share(counts_DLE: torch.Tensor, k: int) -> dict[str, object]:
    """Share of each domain's routed assignments that land on that domain's k most-used experts.

    counts_DLE: [D, L, E]. Per (domain, layer): the sum of the k largest entries of the domain's
    row over the row's sum; k/E under uniform routing (2/16 = 0.125), 1 when the domain uses only
    k experts (with top-k routing that is every token sent to the same k experts). A domain with
    no assignments in a layer gets NaN there.
    Returns per_domain (mean over layers) [D], per_layer [L][D] and mean (over domains and layers).
    """
    if counts_DLE.ndim != 3:
        raise ValueError(f"counts_DLE has shape {tuple(counts_DLE.shape)}; expected [D, L, E]")
    D, L, E = counts_DLE.shape
    if not 1 <= k <= E:
        raise ValueError(f"k={k} must be in [1, E={E}]")
    c = counts_DLE.double()
    tot = c.sum(dim=-1)
    share_DL = c.topk(k, dim=-1).values.sum(dim=-1) / tot.where(tot > 0, torch.tensor(float("nan")))
    return {"k": k, "uniform": k / E, "mean": float(share_DL.nanmean()),
            "per_domain": [float(v) for v in share_DL.nanmean(dim=1)],
            "per_layer": [[round(float(share_DL[d, layer]), 4) for d in range(D)] for layer in range(L)]}


def per_domain_nmi(counts_DLE: torch.Tensor) -> dict[str, object]:
    """One-vs-rest NMI per domain: I(1[domain = d]; expert) / H(1[domain = d]), per layer, over
    routed assignments as in domain_specialisation. 1 when the experts that domain d's tokens use
    take no token from any other domain, 0 when d's tokens spread like everyone else's.
    Returns per_domain (mean over layers) [D] and per_layer [L][D]."""
    if counts_DLE.ndim != 3:
        raise ValueError(f"counts_DLE has shape {tuple(counts_DLE.shape)}; expected [D, L, E]")
    D, L, _ = counts_DLE.shape
    per_layer = []
    for layer in range(L):
        c = counts_DLE[:, layer].double()
        row = []
        for d in range(D):
            joint = torch.stack([c[d], c.sum(dim=0) - c[d]])
            mi, h, _ = mutual_information_bits(joint)
            row.append(mi / h if h > 0 else float("nan"))
        per_layer.append(row)
    t = torch.tensor(per_layer, dtype=torch.float64)
    return {"per_domain": [float(v) for v in t.nanmean(dim=0)],
            "per_layer": [[round(v, 4) for v in r] for r in per_layer]}
