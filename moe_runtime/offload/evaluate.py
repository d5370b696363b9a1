"""Compare routing predictors on held-out text: lookahead gating, exact (pre-attention), learned.

Legend: B batch, S sequence, T = B*S tokens, E experts, K top-k, d lookahead distance.

One teacher-forced forward pass records the hidden state entering every MoE block and every
layer's actual top-k; each predictor then names, per token, the K experts it expects at MoE layers
m .. m+depth from what it could know before block m's attention. Precision and recall are per
token (|predicted| = |actual| = K, so they coincide here; the engine's per-pass unions differ).
An offline tool: every comparison runs on the host (device tensors are copied there: host syncs).
"""
from __future__ import annotations

from typing import Any

import torch

from moe_runtime.offload.predictor import LearnedPredictor, LookaheadPredictor, PredictionStats, moe_block_index, multihot


def _accumulate(stats: PredictionStats, j: int, d: int, P_TE: torch.Tensor, A_TE: torch.Tensor) -> None:
    stats.add_counts(j, d, int((P_TE * A_TE).sum()), int((P_TE * (1 - A_TE)).sum()), int(((1 - P_TE) * A_TE).sum()))


@torch.no_grad()
def capture(model, tokens_BS: torch.Tensor) -> tuple[dict[int, torch.Tensor], list[torch.Tensor]]:
    """Hidden state entering each block, and each MoE layer's top-k [T, K], from one forward pass."""
    moe, _ = moe_block_index(model)
    hidden: dict[int, torch.Tensor] = {}
    actual: list[torch.Tensor | None] = [None] * len(moe)
    hooks = [blk.register_forward_pre_hook(lambda _m, args, b=b: hidden.__setitem__(b, args[0]))
             for b, blk in enumerate(model.blocks)]
    hooks += [blk.ffn.router.register_forward_hook(lambda _m, _i, out, m=m: actual.__setitem__(m, out.topk_idx_TK))
              for m, blk in enumerate(moe)]
    try:
        model(tokens_BS)
    finally:
        for h in hooks:
            h.remove()
    return hidden, actual


@torch.no_grad()
def evaluate_predictors(model, tokens_BS: torch.Tensor, *, depth: int = 1,
                        learned: LearnedPredictor | None = None) -> dict[str, Any]:
    """{'lookahead': summary, 'exact': summary or None, 'learned': summary or None, 'chance': K/E}."""
    model.eval()
    moe, _ = moe_block_index(model)
    B, S = tokens_BS.shape
    T, E, K = B * S, model.cfg.moe.num_experts, model.cfg.moe.top_k
    hidden, actual = capture(model, tokens_BS)
    A = [multihot(a, T, E, "cpu") for a in actual]
    out: dict[str, Any] = {"chance": K / E, "tokens": T}
    look = LookaheadPredictor(model, depth)
    st = PredictionStats()
    for blk in moe:
        for j, d, idx, _ in look.predict_topk(blk.layer, hidden[blk.layer]):
            _accumulate(st, j, d, multihot(idx, T, E, "cpu"), A[j])
    out["lookahead"] = st.summary()
    out["exact"] = None
    if model.cfg.moe.router_position == "pre_attention":
        st = PredictionStats()
        exact = LookaheadPredictor(model, 0)
        for blk in moe:
            for j, d, idx, _ in exact.predict_topk(blk.layer, hidden[blk.layer]):
                _accumulate(st, j, d, multihot(idx, T, E, "cpu"), A[j])
        out["exact"] = st.summary()
    out["learned"] = _learned(learned, actual, A, B, S, depth) if learned is not None else None
    return out


def _learned(learned: LearnedPredictor, actual, A, B: int, S: int, depth: int) -> dict[str, Any]:
    st = PredictionStats()
    T, L = B * S, len(actual)
    for m in range(L):
        src = actual[m - 1].cpu() if m >= 1 else None
        for d in range(min(depth, learned.depth) + 1):
            j = m + d
            if j >= L:
                break
            prev_BSK = torch.full((B, S, actual[j].shape[1]), -1, dtype=torch.long)
            prev_BSK[:, 1:] = actual[j].cpu().view(B, S, -1)[:, :-1]
            idx, _ = learned.predict_topk(j, d, src, prev_BSK.view(T, -1), T)
            _accumulate(st, j, d, multihot(idx, T, learned.E, "cpu"), A[j])
    return st.summary()


def format_comparison(res: dict[str, Any]) -> str:
    """One line per predictor and distance: precision / recall."""
    lines = [f"{res['tokens']} tokens; chance precision K/E = {res['chance']:.3f}"]
    for name in ("lookahead", "exact", "learned"):
        s = res.get(name)
        if s is None:
            lines.append(f"{name:>10}: not applicable")
            continue
        per_d = ", ".join(f"d={d}: {v['precision']:.3f}/{v['recall']:.3f}" for d, v in s["per_distance"].items()
                          if v["precision"] is not None)
        lines.append(f"{name:>10}: precision {s['precision']:.3f} recall {s['recall']:.3f}  ({per_d})")
    return "\n".join(lines)


__all__ = ["evaluate_predictors", "capture", "format_comparison"]
