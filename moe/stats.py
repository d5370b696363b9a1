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
