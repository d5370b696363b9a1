"""Dispatchers move routed token copies to their experts and back.

Legend: T tokens, N routed copies (T*K, fewer if dropped), D model dim, E experts, K top-k.

Contract (shared with cluster.dispatch.AllToAllDispatcher and the offload engine):
    dispatch(x_TD, topk_idx_TK, topk_w_TK) -> (x_sorted_ND, counts_E_local, meta)
    combine(y_sorted_ND, meta) -> y_TD
x_sorted rows are grouped by local expert in expert order; counts_E_local[e] rows belong to
local expert e. combine multiplies by the top-k weights and sums each token's K copies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moe_runtime import kernels
class Dispatcher(Protocol):
    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 topk_w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]: ...

    def combine(self, y_sorted_ND: torch.Tensor, meta: Any) -> torch.Tensor: ...


@dataclass
class LocalMeta:
    token_idx_N: torch.Tensor
    """[N] source token of each sorted row."""
    weight_N: torch.Tensor
    """[N] combine weight of each sorted row."""
    num_tokens: int
    dropped: int = 0
    """Assignments dropped by the capacity factor (0 when dropless)."""
    order_N: torch.Tensor | None = None
    """Dropless: which flattened (token, slot) assignment each sorted row is (the sort-based combine)."""
    topk_w_TK: torch.Tensor | None = None
    """Dropless: the combine weights in (token, slot) order."""


class LocalDispatcher:
    """Permute / unpermute in one process. Dropless unless a capacity factor is given."""

    def __init__(self, num_experts: int, capacity_factor: float | None = None):
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.last_drop_rate = 0.0

    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor,
                 topk_w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, LocalMeta]:
        T, K = topk_idx_TK.shape
        order_N, counts_E = kernels.sort_by_expert(topk_idx_TK, self.num_experts)
        token_idx_N = order_N // K
        weight_N = topk_w_TK.reshape(-1).index_select(0, order_N)
        dropped = 0
        if self.capacity_factor is not None:
            token_idx_N, weight_N, counts_E, dropped = self._drop_over_capacity(token_idx_N, weight_N, counts_E, T * K)
        self.last_drop_rate = dropped / max(1, T * K)
        x_sorted_ND = kernels.permute(x_TD, token_idx_N)
        sortable = self.capacity_factor is None and T <= SORT_COMBINE_MAX_TOKENS
        return x_sorted_ND, counts_E, LocalMeta(token_idx_N, weight_N, T, dropped, order_N if sortable else None,
                                                topk_w_TK if sortable else None)

    def _drop_over_capacity(self, token_idx_N, weight_N, counts_E, n_assign):
        """Comparison mode only: keep the first `capacity` rows of each expert (token order)."""
        capacity = math.ceil(self.capacity_factor * n_assign / self.num_experts)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        expert_N = torch.repeat_interleave(torch.arange(self.num_experts, device=counts_E.device), counts_E)
        pos_N = torch.arange(expert_N.numel(), device=counts_E.device) - starts_E[expert_N]
        keep_N = pos_N < capacity
        kept_counts_E = counts_E.clamp(max=capacity)
        dropped = int(n_assign - kept_counts_E.sum())  # host sync: comparison mode only
        return token_idx_N[keep_N], weight_N[keep_N], kept_counts_E, dropped

    def combine(self, y_sorted_ND: torch.Tensor, meta: LocalMeta) -> torch.Tensor:
        if meta.order_N is not None and kernels.backend_for(y_sorted_ND.device) == "reference":
            return sort_combine(y_sorted_ND, meta.order_N, meta.topk_w_TK)
        return kernels.unpermute(y_sorted_ND, meta.token_idx_N, meta.weight_N, meta.num_tokens)


SORT_COMBINE_MAX_TOKENS = 64
"""Up to this many tokens (decode steps, short prefill chunks) the reference backend combines by
sorting back instead of index_add: measured on the 2-core CPU host (2026-12-07), index_add at
T=1-16 took 255-292 us with torch's 2 intra-op threads against 48-65 us for this (equal with one
thread); at T=256 index_add is the faster (95 vs 500 us, one thread)."""


def sort_combine(y_sorted_ND: torch.Tensor, order_N: torch.Tensor, topk_w_TK: torch.Tensor) -> torch.Tensor:
    """Dropless combine without a scatter-add: put the sorted rows back in (token, slot) order
    (row order_N[n] of the flat [T*K] assignments is sorted row n) and weight-sum each token's K
    rows with one batched matmul: out[t] = sum_k w[t, k] * y[t, k]. Weights are rounded to y's
    dtype first, as unpermute does. Differentiable in y and the weights."""
    T, K = topk_w_TK.shape
    D = y_sorted_ND.shape[-1]
    y_TKD = y_sorted_ND.new_empty(T * K, D).index_copy(0, order_N, y_sorted_ND).view(T, K, D)
    return torch.bmm(topk_w_TK.to(y_sorted_ND.dtype).unsqueeze(1), y_TKD).squeeze(1)
