"""Plain-PyTorch references for every kernel in this package.

Legend: T tokens, N = T*K routed token copies, D model dim, F expert hidden dim, E experts.

These are the ground truth the Triton kernels are tested against and the path used on CPU.
They are differentiable through ordinary autograd.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def swiglu(h_NF2: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, with h = [gate | up] along the last dim."""
    gate, up = h_NF2.chunk(2, dim=-1)
    return F.silu(gate) * up


@functools.lru_cache(maxsize=None)
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward AND backward for this device/dtype (probed once)."""
    if not hasattr(torch, "_grouped_mm") or device_type != "cuda":
        # On CPU torch 2.13's _grouped_mm has no working backward; the loop is the reference there.
        return False
    try:
        x = torch.randn(16, 16, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([8, 16], device=device_type, dtype=torch.int32)
        torch._grouped_mm(x, w, offs=offs).sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


def grouped_matmul_reference(x_ND: torch.Tensor, w_EDO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """out[rows of expert e] = x[rows of expert e] @ w[e]; rows are sorted by expert."""
    if grouped_mm_supported(x_ND.device.type, x_ND.dtype) and x_ND.shape[0] > 0:
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return torch._grouped_mm(x_ND, w_EDO, offs=offs)
    # host sync: the loop needs the counts as Python ints (reference path only).
    sizes = counts_E.tolist()
    # unbind once: indexing w_EDO[e] per expert makes backward scatter E full-size gradients (O(E^2)).
    ws = w_EDO.unbind(0)
    # experts without rows are skipped: a decode step leaves most of them empty, and an empty
    # matmul still costs a dispatch (their gradients stay zero through unbind's backward); with no
    # rows at all every expert runs, so the (empty) output stays connected to the graph
    busy = any(sizes)
    outs = [xe @ ws[e] for e, xe in enumerate(torch.split(x_ND, sizes, dim=0)) if sizes[e] or not busy]
    return torch.cat(outs, dim=0) if outs else x_ND.new_zeros(0, w_EDO.shape[-1])


def grouped_mlp_reference(x_sorted_ND: torch.Tensor, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor,
                          counts_E: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert MLP over tokens sorted by expert: y = (silu(x W1) * (x W3)) W2 per expert.

    x_sorted_ND: [N, D] rows grouped by expert in expert order; counts_E: [E] rows per expert
    (sum == N); w13_EDF2: [E, D, 2F] = [gate | up]; w2_EFD: [E, F, D]. Returns [N, D].
    """
    h = grouped_matmul_reference(x_sorted_ND, w13_EDF2, counts_E)
    return grouped_matmul_reference(swiglu(h), w2_EFD, counts_E)


def sort_by_expert_reference(topk_idx_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order of the T*K (token, slot) pairs by expert, and tokens per expert.

    Returns order_N (indices into the flattened [T*K] assignments) and counts_E (int64).
    """
    flat_N = topk_idx_TK.reshape(-1)
    order_N = torch.argsort(flat_N, stable=True)
    if flat_N.is_cuda:  # bincount reads the max on the host: a sync, which no CUDA graph can hold
        counts_E = torch.zeros(num_experts, dtype=torch.long, device=flat_N.device)
        counts_E.scatter_add_(0, flat_N, torch.ones_like(flat_N))
    else:
        counts_E = torch.bincount(flat_N, minlength=num_experts)
    return order_N, counts_E


def permute_reference(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    """Gather: row n of the output is x[token_idx[n]]."""
    return x_TD.index_select(0, token_idx_N)


def unpermute_reference(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor,
                        num_tokens: int) -> torch.Tensor:
    """Weighted scatter-add: out[token_idx[n]] += weight[n] * y[n]. Returns [T, D]."""
    out = y_ND.new_zeros(num_tokens, y_ND.shape[-1])
    return out.index_add(0, token_idx_N, y_ND * weight_N.unsqueeze(-1).to(y_ND.dtype))


def per_token_moe_reference(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor,
                            w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """The slowest, most obvious MoE: a Python loop over tokens and their K experts."""
    rows = []
    for t in range(x_TD.shape[0]):
        acc = x_TD.new_zeros(x_TD.shape[-1])
        for k in range(topk_idx_TK.shape[1]):
            e = int(topk_idx_TK[t, k])
            acc = acc + topk_w_TK[t, k].to(x_TD.dtype) * (swiglu(x_TD[t] @ w13_EDF2[e]) @ w2_EFD[e])
        rows.append(acc)
    return torch.stack(rows) if rows else x_TD.new_zeros(0, x_TD.shape[-1])
