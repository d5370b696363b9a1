"""Expert MLPs: a bank of routed SwiGLU experts with stacked weights, and a dense SwiGLU MLP.

Legend: N routed token copies (sorted by expert), D model dim, F expert hidden dim, E experts.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moe_runtime import kernels
from moe_runtime.kernels.reference import swiglu


class ExpertBank(nn.Module):
    """E SwiGLU experts stored as two stacked tensors; computed dropless with kernels.grouped_mlp.

    w13_EDF2[e] = [W_gate | W_up] of expert e, w2_EFD[e] = W_down. With expert parallelism a bank
    holds only this rank's experts (`expert_offset` is the global id of its first expert).
    """

    def __init__(self, num_experts: int, d_model: int, d_expert: int, *, init_std: float = 0.02,
                 out_std: float | None = None, expert_offset: int = 0):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.expert_offset = expert_offset
        self.w13_EDF2 = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_expert))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        nn.init.normal_(self.w13_EDF2, std=init_std)
        nn.init.normal_(self.w2_EFD, std=out_std if out_std is not None else init_std)

    def forward(self, x_sorted_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_sorted_ND: rows grouped by (local) expert; counts_E: [E_local] rows per expert."""
        dtype = compute_dtype(x_sorted_ND)
        return kernels.grouped_mlp(x_sorted_ND.to(dtype), self.w13_EDF2.to(dtype), self.w2_EFD.to(dtype), counts_E)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_expert={self.d_expert}, "
                f"expert_offset={self.expert_offset}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: autocast's dtype when autocast is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class SwiGLUMLP(nn.Module):
    """Dense SwiGLU FFN: (silu(x Wg) * (x Wu)) Wd. Used for dense layers and shared experts."""

    def __init__(self, d_model: int, d_hidden: int, *, init_std: float = 0.02, out_std: float | None = None):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * d_hidden, bias=False)
        self.w2 = nn.Linear(d_hidden, d_model, bias=False)
        nn.init.normal_(self.w13.weight, std=init_std)
        nn.init.normal_(self.w2.weight, std=out_std if out_std is not None else init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w13(x)))


def dense_from_single_expert(bank: ExpertBank, expert: int = 0) -> SwiGLUMLP:
    """A dense SwiGLUMLP with the weights of one expert (for the E=1 equivalence test)."""
    mlp = SwiGLUMLP(bank.d_model, bank.d_expert)
    with torch.no_grad():
        mlp.w13.weight.copy_(bank.w13_EDF2[expert].T)
        mlp.w2.weight.copy_(bank.w2_EFD[expert].T)
    return mlp


__all__ = ["ExpertBank", "SwiGLUMLP", "dense_from_single_expert"]
