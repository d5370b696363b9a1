"""MoELayer: route -> dispatch -> experts -> combine (+ shared experts).

Legend: T tokens, D model dim, E experts, K top-k.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from moe_runtime.core.config import MoEConfig
from moe_runtime.core.dispatch import Dispatcher, LocalDispatcher
from moe_runtime.core.experts import ExpertActivation, ExpertBank, SwiGLUMLP
from moe_runtime.core.router import RouterOutput, TopKRouter


class MoELayer(nn.Module):
    """A sparse FFN. It never knows where its experts live: swap `dispatcher` (expert parallel)
    or `experts` (offloaded cache) and the math stays the same."""

    def __init__(self, d_model: int, cfg: MoEConfig, *, init_std: float = 0.02, out_std: float | None = None):
        super().__init__()
        self.cfg = cfg
        self.router = TopKRouter(d_model, cfg, init_std)
        self.experts = ExpertBank(cfg.num_experts, d_model, cfg.d_expert, init_std=init_std, out_std=out_std,
                                  bias=cfg.expert_bias, act=ExpertActivation.of(cfg))
        self.shared = (SwiGLUMLP(d_model, cfg.d_shared_expert, init_std=init_std, out_std=out_std)
                       if cfg.num_shared_experts else None)
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if cfg.shared_expert_gate else None
        if self.shared_gate is not None:
            nn.init.normal_(self.shared_gate.weight, std=init_std)
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.num_experts, cfg.capacity_factor)

    def route(self, x_TD: torch.Tensor) -> RouterOutput:
        return self.router(x_TD)

    def forward(self, x_TD: torch.Tensor, routing: RouterOutput | None = None) -> tuple[torch.Tensor, RouterOutput]:
        """1. route (unless a pre-attention router already did), 2. dispatch token copies to their
        experts, 3. run the experts grouped, 4. combine with the top-k weights, 5. add shared experts."""
        if routing is None:
            routing = self.route(x_TD)
        x_sorted, counts_E, meta = self.dispatcher.dispatch(x_TD, routing.topk_idx_TK, routing.topk_w_TK)
        y_sorted = self.experts(x_sorted, counts_E)
        y_TD = self.dispatcher.combine(y_sorted, meta).to(x_TD.dtype)
        if self.shared is not None:
            s_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                s_TD = torch.sigmoid(self.shared_gate(x_TD)) * s_TD
            y_TD = y_TD + s_TD
        return y_TD, routing


def out_proj_std(init_std: float, n_layers: int) -> float:
    """GPT-2 style: residual-branch output projections scaled by 1/sqrt(2L)."""
    return init_std / math.sqrt(2 * n_layers)
