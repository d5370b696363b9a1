"""Launcher of the grouped SwiGLU expert MLP on quantised weights (kernels: _quant_gemm_kernels.py).

Legend: N routed rows sorted by expert, D model dim, F expert hidden dim, E experts.

    grouped_mlp_quant_triton(x_ND, experts, counts_E) == quant.grouped_mlp_quant_reference(...)

Inference only: quantised weights are not trained, so there is no backward and no torch.library op
(its schema cannot carry a QuantExperts; a custom op would add nothing a forward call needs).
Two launches per layer (gate/up with SwiGLU, then down), like kernels/grouped_gemm.py's forward.
"""
from __future__ import annotations

import torch
import triton

from moe_runtime.kernels import _common
from moe_runtime.kernels._quant_gemm_kernels import FMT_CODE, INTERPRETED, _qgemm_kernel, _qswiglu_kernel
from moe_runtime.kernels._grouped_gemm_kernels import row_tile_bound
from moe_runtime.kernels.quant import QuantExperts, QWeight


def _field_args(w: QWeight) -> tuple:
    q, s = w.fields["q"], w.fields["scale"]
    z = w.fields.get("zero", s)
    for name, t in w.fields.items():
        if not t.is_contiguous():
            raise ValueError(f"quantised field {name} of shape {tuple(t.shape)} is not contiguous; pass a bank view")
    return (q, s, z), dict(stride_qe=q.stride(0), stride_qo=q.stride(1), stride_se=s.stride(0), stride_so=s.stride(1),
                           FMT=FMT_CODE[w.fmt], GROUP=max(w.group, 1))


def check_quant_mlp_inputs(x_ND: torch.Tensor, experts: QuantExperts, counts_E: torch.Tensor) -> None:
    """ValueError unless x, the quantised bank and the counts agree."""
    _common.check_matrix("x_sorted_ND", x_ND)
    _common.check_index("counts_E", counts_E)
    E = counts_E.shape[0]
    if experts.n != E:
        raise ValueError(f"the quantised bank holds {experts.n} experts but counts_E has {E} entries")
    if experts.w13.K != x_ND.shape[1] or experts.w2.O != x_ND.shape[1] or experts.w2.K * 2 != experts.w13.O:
        raise ValueError(f"quantised experts have D={experts.w13.K}, 2F={experts.w13.O}; rows have D={x_ND.shape[1]}")
    _common.check_device(INTERPRETED, x_sorted_ND=x_ND, w13_q=experts.w13.fields["q"],
                         w2_q=experts.w2.fields["q"], counts_E=counts_E)
    _common.check_counts(counts_E, E, x_ND.shape[0])


def _meta(N: int, E: int, dtype: torch.dtype) -> dict:
    return dict(N=N, E=E, M_HINT=min(4096, triton.next_power_of_2(max(1, N // max(E, 1)))),
                BLOCK_E=triton.next_power_of_2(E), INTERPRETER=INTERPRETED, PRECISION=_common.dot_precision(dtype))


def grouped_mlp_quant_triton(x_sorted_ND: torch.Tensor, experts: QuantExperts, counts_E: torch.Tensor) -> torch.Tensor:
    """y = (silu(x W_gate[e]) * (x W_up[e])) W2[e] with W decoded inside the weight loads.

    x_sorted_ND: [N, D] fp32/bf16/fp16 rows grouped by expert; experts: a QuantExperts bank of E
    experts (views of a store or slot buffer) on x's device; counts_E: [E] rows per expert (sum N).
    Returns [N, D] in x's dtype (fp32 accumulation; h and a rounded to x's dtype as the reference does)."""
    check_quant_mlp_inputs(x_sorted_ND, experts, counts_E)
    N, D = x_sorted_ND.shape
    F, E = experts.w2.K, counts_E.shape[0]
    a_NF = _common.empty_output((N, F), x_sorted_ND)
    y_ND = _common.empty_output((N, D), x_sorted_ND)
    if N == 0:
        return y_ND
    meta = _meta(N, E, x_sorted_ND.dtype)
    ptrs, strides = _field_args(experts.w13)
    grid = lambda cfg: (row_tile_bound(N, E, cfg["BLOCK_M"]) * triton.cdiv(F, cfg["BLOCK_N"]),)
    _qswiglu_kernel[grid](x_sorted_ND, *ptrs, counts_E, a_NF, D=D, F=F, **strides, **meta)
    ptrs, strides = _field_args(experts.w2)
    grid = lambda cfg: (row_tile_bound(N, E, cfg["BLOCK_M"]) * triton.cdiv(D, cfg["BLOCK_N"]),)
    _qgemm_kernel[grid](a_NF, *ptrs, counts_E, y_ND, K=F, O=D, **strides, **meta)
    return y_ND


__all__ = ["grouped_mlp_quant_triton", "check_quant_mlp_inputs"]
