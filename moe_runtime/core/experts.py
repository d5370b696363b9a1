"""Expert MLPs: a bank of routed SwiGLU experts with stacked weights, and a dense SwiGLU MLP.

Legend: N routed token copies (sorted by expert), D model dim, F expert hidden dim, E experts.

gpt-oss experts (MoEConfig.expert_bias / expert_act='clamped_swiglu') add biases to both matmuls
and clamp the SwiGLU: y = act(x W13 + b13) W2 + b2. They run through `expert_mlp`, torch matmuls
per expert group (kernels.reference.grouped_matmul_reference: torch._grouped_mm on CUDA where it
works, a loop elsewhere): the fused Triton SwiGLU kernel computes plain SwiGLU without biases, so
these experts never take it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moe_runtime import kernels
from moe_runtime.kernels.reference import grouped_matmul_reference, swiglu


@dataclass(frozen=True)
class ExpertActivation:
    """The routed experts' activation on h = [gate | up]: plain SwiGLU, or gpt-oss' clamped SwiGLU
    (up.clamp(-limit, limit) + 1) * g * sigmoid(alpha * g), g = gate.clamp(max=limit)."""

    kind: str = "swiglu"
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def of(cls, moe_cfg) -> "ExpertActivation":
        return cls(moe_cfg.expert_act, moe_cfg.swiglu_alpha, moe_cfg.swiglu_limit)

    def __call__(self, h_NF2: torch.Tensor) -> torch.Tensor:
        if self.kind == "swiglu":
            return swiglu(h_NF2)
        gate, up = h_NF2.chunk(2, dim=-1)
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


PLAIN = ExpertActivation()


def expert_rows(counts_E: torch.Tensor, n: int) -> torch.Tensor:
    """[N] the expert of each sorted row (no host sync: the output size is given)."""
    return torch.repeat_interleave(torch.arange(counts_E.shape[0], device=counts_E.device), counts_E, output_size=n)


def expert_mlp(x_sorted_ND: torch.Tensor, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor, counts_E: torch.Tensor,
               b13_EF2: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
               act: ExpertActivation = PLAIN) -> torch.Tensor:
    """act(x W13[e] + b13[e]) W2[e] + b2[e] over rows sorted by expert; without biases and with plain
    SwiGLU exactly kernels.grouped_mlp (Triton on CUDA). Returns [N, D] in x's dtype."""
    if b13_EF2 is None and b2_ED is None and act.kind == "swiglu":
        return kernels.grouped_mlp(x_sorted_ND, w13_EDF2, w2_EFD, counts_E)
    rows = expert_rows(counts_E, x_sorted_ND.shape[0]) if b13_EF2 is not None or b2_ED is not None else None
    h = grouped_matmul_reference(x_sorted_ND, w13_EDF2, counts_E)
    if b13_EF2 is not None:
        h = h + b13_EF2.to(h.dtype)[rows]
    y = grouped_matmul_reference(act(h), w2_EFD, counts_E)
    if b2_ED is not None:
        y = y + b2_ED.to(y.dtype)[rows]
    return y


class ExpertBank(nn.Module):
    """E SwiGLU experts stored as two stacked tensors; computed dropless with kernels.grouped_mlp.

    w13_EDF2[e] = [W_gate | W_up] of expert e, w2_EFD[e] = W_down. With expert parallelism a bank
    holds only this rank's experts (`expert_offset` is the global id of its first expert).
    """

    def __init__(self, num_experts: int, d_model: int, d_expert: int, *, init_std: float = 0.02,
                 out_std: float | None = None, expert_offset: int = 0, bias: bool = False,
                 act: ExpertActivation = PLAIN):
        super().__init__()
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.expert_offset, self.act = expert_offset, act
        self.w13_EDF2 = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_expert))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        nn.init.normal_(self.w13_EDF2, std=init_std)
        nn.init.normal_(self.w2_EFD, std=out_std if out_std is not None else init_std)
        # gpt-oss: b13_EF2 [E, 2F] = [gate | up] biases, b2_ED [E, D]; None for every other family
        self.b13_EF2 = nn.Parameter(torch.zeros(num_experts, 2 * d_expert)) if bias else None
        self.b2_ED = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    def forward(self, x_sorted_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """x_sorted_ND: rows grouped by (local) expert; counts_E: [E_local] rows per expert."""
        dtype = compute_dtype(x_sorted_ND)
        if self.b13_EF2 is None and self.act.kind == "swiglu":
            return kernels.grouped_mlp(x_sorted_ND.to(dtype), self.w13_EDF2.to(dtype), self.w2_EFD.to(dtype),
                                       counts_E)
        b13, b2 = (None, None) if self.b13_EF2 is None else (self.b13_EF2, self.b2_ED)
        return expert_mlp(x_sorted_ND.to(dtype), self.w13_EDF2.to(dtype), self.w2_EFD.to(dtype), counts_E,
                          b13, b2, self.act)

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


__all__ = ["ExpertBank", "SwiGLUMLP", "dense_from_single_expert", "ExpertActivation", "expert_mlp", "expert_rows"]
