"""Routing predictors: lookahead gating, exact pre-attention routing, and a learned predictor.

Legend: B batch, S sequence, T tokens, D model dim, E experts, K top-k, L MoE layers,
d lookahead distance (target MoE layer minus the MoE layer about to run).

- Lookahead gating (mixtral-offloading, AdapMoE): before block l's attention, apply the routers of
  MoE layers l .. l+depth to the hidden state entering block l (through the norm each router
  normally sees). It calls the model's own TopKRouter, so scoring, bias and top-k are the model's.
- Exact (SmallThinker, Read-ME): a model trained with router_position="pre_attention" routes from
  the block input before attention, so the layer's experts are known while attention runs; the
  engine takes them from the router's own output. Never wrong by construction.
- Learned: a logistic head per (target layer, distance) trained from routing traces alone. Its
  features are the experts this token chose at the last layer already run (layer j-d-1) and the
  experts the previous token chose at the target layer j.
Precision / recall are kept per target layer and per distance.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

Prediction = tuple[int, int, dict[int, float]]
"""(target MoE layer, distance, expert -> confidence)."""


class PredictionStats:
    """True/false positives and false negatives per (target layer, distance)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], list[int]] = {}

    def add_counts(self, layer: int, distance: int, tp: int, fp: int, fn: int) -> None:
        c = self.counts.setdefault((layer, distance), [0, 0, 0])
        c[0] += tp
        c[1] += fp
        c[2] += fn

    def update(self, layer: int, distance: int, predicted: Iterable[int], actual: Iterable[int]) -> None:
        p, a = set(predicted), set(actual)
        self.add_counts(layer, distance, len(p & a), len(p - a), len(a - p))

    @staticmethod
    def _pr(tp: int, fp: int, fn: int) -> dict[str, float | None]:
        return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None}

    def _group(self, index: int) -> dict[str, dict[str, float | None]]:
        acc: dict[int, list[int]] = {}
        for key, c in self.counts.items():
            a = acc.setdefault(key[index], [0, 0, 0])
            for i in range(3):
                a[i] += c[i]
        return {str(k): self._pr(*acc[k]) for k in sorted(acc)}

    def summary(self) -> dict:
        """JSON-able: overall, per_layer and per_distance precision / recall (None where undefined)."""
        tot = [sum(c[i] for c in self.counts.values()) for i in range(3)]
        return {**self._pr(*tot), "per_layer": self._group(0), "per_distance": self._group(1)}


def moe_block_index(model) -> tuple[list, list[int | None]]:
    """MoE blocks in order, and for each block index the first MoE layer at or after it."""
    moe = [b for b in model.blocks if b.is_moe]
    first: list[int | None] = []
    for i in range(len(model.blocks)):
        nxt = [m for m, b in enumerate(moe) if b.layer >= i]
        first.append(nxt[0] if nxt else None)
    return moe, first


def router_norm(block) -> nn.Module:
    """The norm whose output the block's router sees."""
    return block.attn_norm if block.pre_attention_router else block.ffn_norm


class LookaheadPredictor:
    """Routers of layers l .. l+depth applied to the hidden state entering block l."""

    name = "lookahead"

    def __init__(self, model, depth: int = 1, *, skip_distance0: bool = False):
        if depth < 0:
            raise ValueError(f"lookahead_depth={depth} must be >= 0")
        self.depth, self.skip_distance0 = depth, skip_distance0
        self.moe, self.first_moe = moe_block_index(model)

    def targets(self, block: int) -> list[tuple[int, int]]:
        m = self.first_moe[block]
        if m is None:
            return []
        lo = 1 if self.skip_distance0 else 0
        return [(m + d, d) for d in range(lo, self.depth + 1) if m + d < len(self.moe)]

    @torch.no_grad()
    def predict_topk(self, block: int, h_BSD: torch.Tensor) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(target, distance, topk_idx_TK, topk_w_TK) on the device, no host sync."""
        out = []
        D = h_BSD.shape[-1]
        for j, d in self.targets(block):
            blk = self.moe[j]
            x_TD = router_norm(blk)(h_BSD).reshape(-1, D)
            # .forward, not __call__: module hooks must not mistake a lookahead for the layer's routing.
            r = blk.ffn.router.forward(x_TD)
            out.append((j, d, r.topk_idx_TK, r.topk_w_TK))
        return out

    def predict(self, block: int, h_BSD: torch.Tensor) -> list[Prediction]:
        return to_predictions(self.predict_topk(block, h_BSD))


def to_predictions(raw: list[tuple[int, int, torch.Tensor, torch.Tensor]]) -> list[Prediction]:
    """Union over tokens of each target's top-k, confidence = the largest weight seen."""
    if not raw:
        return []
    flat = [r[2].reshape(-1).float() for r in raw] + [r[3].reshape(-1).float() for r in raw]
    packed = torch.cat(flat).tolist()  # host sync: ONE small copy for every target's ids and weights
    n_all = sum(r[2].numel() for r in raw)
    idx, w = [int(i) for i in packed[:n_all]], packed[n_all:]
    preds, at = [], 0
    for j, d, i_TK, _ in raw:
        n = i_TK.numel()
        conf: dict[int, float] = {}
        for e, c in zip(idx[at:at + n], w[at:at + n]):
            conf[e] = max(conf.get(e, 0.0), c)
        preds.append((j, d, conf))
        at += n
    return preds


class ExactPredictor:
    """The pre-attention router's own output: the layer's experts before its attention runs."""

    name = "exact"

    def __init__(self, model):
        pos = model.cfg.moe.router_position
        if pos != "pre_attention":
            raise ValueError(f"predictor='exact' needs a model trained with router_position='pre_attention' "
                             f"(this one routes {pos!r}); use predictor='lookahead' or 'learned'")

    @staticmethod
    def from_routing(layer: int, topk_idx_TK: torch.Tensor) -> Prediction:
        experts = set(topk_idx_TK.reshape(-1).tolist())  # host sync: the layer's expert ids
        return layer, 0, {e: 1.0 for e in experts}


def multihot(idx_TK: torch.Tensor | None, T: int, E: int, device) -> torch.Tensor:
    """[T, E] 0/1 rows from expert ids; ids < 0 (unknown) set nothing."""
    out = torch.zeros(T, E, device=device)
    if idx_TK is not None:
        idx = idx_TK.to(device).long()
        out.scatter_add_(1, idx.clamp_min(0), (idx >= 0).float()).clamp_(max=1.0)
    return out


class LearnedPredictor(nn.Module):
    """Logistic heads W[j, d]: [src choices | previous token's choices] (2E) -> E expert logits."""

    name = "learned"

    def __init__(self, num_layers: int, num_experts: int, top_k: int, depth: int):
        super().__init__()
        self.L, self.E, self.K, self.depth = num_layers, num_experts, top_k, depth
        self.weight = nn.Parameter(torch.zeros(num_layers, depth + 1, 2 * num_experts, num_experts))
        self.bias = nn.Parameter(torch.zeros(num_layers, depth + 1, num_experts))

    def logits(self, j: int, d: int, src_TK: torch.Tensor | None, prev_TK: torch.Tensor | None,
               T: int) -> torch.Tensor:
        """src_TK: this token's experts at layer j-d-1 (None before the first layer); prev_TK: the
        previous token's experts at layer j (None at a sequence start). Returns [T, E]."""
        dev = self.weight.device
        x = torch.cat([multihot(src_TK, T, self.E, dev), multihot(prev_TK, T, self.E, dev)], dim=1)
        return x @ self.weight[j, d] + self.bias[j, d]

    @torch.no_grad()
    def predict_topk(self, j: int, d: int, src_TK, prev_TK, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.logits(j, d, src_TK, prev_TK, T).sigmoid()
        top = p.topk(self.K, dim=-1)
        return top.indices, top.values

    @classmethod
    def fit(cls, trace, depth: int = 1, *, steps: int = 300, lr: float = 0.05, seed: int = 0,
            max_tokens: int | None = None) -> "LearnedPredictor":
        """Train every head at once (full batch, Adam, BCE) on a RoutingTrace's token table;
        `max_tokens` trains on a seeded sample of that many tokens (large shapes: E = 128)."""
        choices_NLK, prev_N, _ = trace.token_table()
        if choices_NLK.shape[0] == 0:
            raise ValueError("the trace holds no complete token (every MoE layer recorded); record a longer trace")
        torch.manual_seed(seed)
        if max_tokens is not None and choices_NLK.shape[0] > max_tokens:
            keep = torch.randperm(choices_NLK.shape[0])[:max_tokens].sort().values
            remap = torch.full((choices_NLK.shape[0],), -1, dtype=torch.long)
            remap[keep] = torch.arange(keep.numel())
            p = prev_N[keep]
            prev_N = torch.where(p >= 0, remap[p.clamp_min(0)], p)  # a predecessor left out: no feature
            choices_NLK = choices_NLK[keep]
        model = cls(trace.num_layers, trace.num_experts, trace.top_k, depth)
        X, Y = model._design(choices_NLK, prev_N)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            logits = torch.einsum("jdnf,jdfe->jdne", X, model.weight) + model.bias[:, :, None]
            loss = F.binary_cross_entropy_with_logits(logits, Y[:, None].expand_as(logits))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.losses = (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))
        """(first, last) training loss: BCE over all heads."""
        return model.eval()

    def _design(self, choices_NLK: torch.Tensor, prev_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        N, L, E = choices_NLK.shape[0], self.L, self.E
        hot_NLE = torch.zeros(N, L, E).scatter_(2, choices_NLK.long(), 1.0)
        prev_hot = torch.where((prev_N >= 0)[:, None, None], hot_NLE[prev_N.clamp_min(0)], torch.zeros(()))
        X = torch.zeros(L, self.depth + 1, N, 2 * E)
        for j in range(L):
            for d in range(self.depth + 1):
                if j - d - 1 >= 0:
                    X[j, d, :, :E] = hot_NLE[:, j - d - 1]
                X[j, d, :, E:] = prev_hot[:, j]
        return X, hot_NLE.permute(1, 0, 2).contiguous()


__all__ = ["Prediction", "PredictionStats", "LookaheadPredictor", "ExactPredictor", "LearnedPredictor",
           "to_predictions", "moe_block_index", "router_norm", "multihot"]
