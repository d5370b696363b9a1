"""Grouped GEMM over rows sorted by expert, and the fused SwiGLU expert MLP on top of it.

Legend: N routed rows sorted by expert, D model dim, F expert hidden dim, E experts,
K a GEMM's reduction dim, O its output dim, P x Q a weight gradient's tile dims.

Layers (STYLE.md): `@triton.jit` kernels in kernels/_grouped_gemm_kernels.py; here the launchers
(`_launch_*`: allocate, launch) and the `torch.library` ops in the `moe_kernels` namespace with
fake and autograd registrations. Inputs are checked once, in the forward ops. Public entry points:
    grouped_gemm_triton(x_NK, w_EKO, counts_E)            == reference.grouped_matmul_reference
    grouped_mlp_triton(x_ND, w13_EDF2, w2_EFD, counts_E)  == reference.grouped_mlp_reference

Forward:  a = silu(x W13_gate) * (x W13_up)   one kernel; h = x W13 is stored for the backward
          y = a W2
Backward: dA = dY W2^T                        one kernel whose epilogue turns dA into dH using h,
                                              and recomputes a from h (so a is never kept alive)
          dX = dH W13^T,  dW2[e] = a_e^T dY_e,  dW13[e] = x_e^T dH_e
Counts never leave the device: every kernel derives its rows from counts_E itself (see
kernels/_grouped_gemm_kernels.py), so the ops can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton

from moe_runtime.kernels import _common
from moe_runtime.kernels._grouped_gemm_kernels import (INTERPRETED, _grouped_gemm_kernel, _grouped_wgrad_kernel,
                                           _swiglu_gemm_kernel, row_tile_bound)

EPILOGUE_STORE, EPILOGUE_SWIGLU_BWD = 0, 1


# ---------------------------------------------------------------- launchers (allocate, launch)

def _meta(x_NK: torch.Tensor, counts_E: torch.Tensor) -> dict:
    """Launch arguments shared by every kernel here, from host-side shapes only (no sync)."""
    N, E = x_NK.shape[0], counts_E.shape[0]
    return dict(
        N=N, E=E,
        # autotune key only: a power-of-two bucket of the mean rows per expert, so decode-sized and
        # training-sized batches get their own tile shapes without retuning on every new N
        M_HINT=min(4096, triton.next_power_of_2(max(1, N // max(E, 1)))),
        BLOCK_E=triton.next_power_of_2(E),
        INTERPRETER=INTERPRETED,
        PRECISION=_common.dot_precision(x_NK.dtype),
    )


def _launch_swiglu_gemm(x_ND: torch.Tensor, w13_EDF2: torch.Tensor, counts_E: torch.Tensor,
                        store_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """a_NF = silu(x W_gate[e]) * (x W_up[e]) and, if store_h, h_NF2 = x W13[e] (else an empty h)."""
    N, D = x_ND.shape
    F = w13_EDF2.shape[2] // 2
    a_NF = _common.empty_output((N, F), x_ND)
    h_NF2 = _common.empty_output((N, 2 * F) if store_h else (0, 2 * F), x_ND)
    if N == 0:
        return a_NF, h_NF2
    meta = _meta(x_ND, counts_E)
    grid = lambda cfg: (row_tile_bound(N, meta["E"], cfg["BLOCK_M"]) * triton.cdiv(F, cfg["BLOCK_N"]),)
    _swiglu_gemm_kernel[grid](
        x_ND, w13_EDF2, counts_E, h_NF2, a_NF, D=D, F=F,
        stride_xm=x_ND.stride(0), stride_xk=x_ND.stride(1),
        stride_we=w13_EDF2.stride(0), stride_wk=w13_EDF2.stride(1), stride_wn=w13_EDF2.stride(2),
        STORE_H=store_h, **meta)
    return a_NF, h_NF2


def _launch_grouped_gemm(a_NK: torch.Tensor, b_EKO: torch.Tensor, counts_E: torch.Tensor,
                         swiglu_h_NF2: torch.Tensor | None = None):
    """c_NO = a_NK @ b_EKO[e] per expert. Any strides (a transposed weight is a view, not a copy).

    With swiglu_h_NF2 (forward pre-activation [gate | up]) the product is dA and the epilogue
    returns (dH_NF2, a_NF) instead: the SwiGLU backward and the recomputed activation.
    """
    N, K = a_NK.shape
    O = b_EKO.shape[2]
    epilogue = EPILOGUE_STORE if swiglu_h_NF2 is None else EPILOGUE_SWIGLU_BWD
    if epilogue == EPILOGUE_STORE:
        c = _common.empty_output((N, O), a_NK)
        h, act = c, c  # unused by this epilogue
    else:
        c = _common.empty_output((N, 2 * O), a_NK)
        h, act = swiglu_h_NF2, _common.empty_output((N, O), a_NK)
    if N > 0:
        meta = _meta(a_NK, counts_E)
        grid = lambda cfg: (row_tile_bound(N, meta["E"], cfg["BLOCK_M"]) * triton.cdiv(O, cfg["BLOCK_N"]),)
        _grouped_gemm_kernel[grid](
            a_NK, b_EKO, counts_E, c, h, act, K=K, O=O,
            stride_am=a_NK.stride(0), stride_ak=a_NK.stride(1),
            stride_be=b_EKO.stride(0), stride_bk=b_EKO.stride(1), stride_bo=b_EKO.stride(2),
            stride_cm=c.stride(0), stride_co=c.stride(1), EPILOGUE=epilogue, **meta)
    return c if epilogue == EPILOGUE_STORE else (c, act)


def _launch_wgrad(a_NP: torch.Tensor, b_NQ: torch.Tensor, counts_E: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """c_EPQ[e] = a_e^T @ b_e over expert e's rows (zeros for an expert without rows)."""
    N, P = a_NP.shape
    Q = b_NQ.shape[1]
    E = counts_E.shape[0]
    if N == 0:
        return torch.zeros(E, P, Q, dtype=out_dtype, device=a_NP.device)
    c_EPQ = _common.empty_output((E, P, Q), a_NP, out_dtype)
    meta = _meta(a_NP, counts_E)
    grid = lambda cfg: (triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(Q, cfg["BLOCK_Q"]), E)
    _grouped_wgrad_kernel[grid](
        a_NP, b_NQ, counts_E, c_EPQ, P=P, Q=Q,
        stride_am=a_NP.stride(0), stride_ap=a_NP.stride(1),
        stride_bm=b_NQ.stride(0), stride_bq=b_NQ.stride(1), **meta)
    return c_EPQ


# ---------------------------------------------------------------- input checks

def _check_rows(x_NK: torch.Tensor, counts_E: torch.Tensor, *, x_name: str) -> None:
    _common.check_matrix(x_name, x_NK)
    _common.check_index("counts_E", counts_E)
    if counts_E.shape[0] == 0:
        raise ValueError("counts_E is empty; there must be at least one expert")


def _check_weight(name: str, w: torch.Tensor, x: torch.Tensor, E: int, rows: int, *, dims: str) -> None:
    _common.check_matrix(name, w, ndim=3)
    if w.dtype != x.dtype:
        raise ValueError(f"{name} has dtype {w.dtype} but the rows have {x.dtype}; cast both to one dtype")
    if w.shape[0] != E:
        raise ValueError(f"{name} holds {w.shape[0]} experts but counts_E has {E} entries")
    if w.shape[1] != rows:
        raise ValueError(f"{name} has shape {tuple(w.shape)}, expected [E, {rows}, ...] ({dims})")


def check_grouped_mlp_inputs(x_ND: torch.Tensor, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor,
                             counts_E: torch.Tensor) -> None:
    """ValueError unless the inputs of grouped_mlp_triton are consistent (see its docstring).
    Shapes first; the counts' values last, as they need device work."""
    _check_rows(x_ND, counts_E, x_name="x_sorted_ND")
    E, D = counts_E.shape[0], x_ND.shape[1]
    _check_weight("w13_EDF2", w13_EDF2, x_ND, E, D, dims="w13_EDF2[e] = [W_gate | W_up], D x 2F")
    if w13_EDF2.shape[2] % 2 or w13_EDF2.shape[2] == 0:
        raise ValueError(f"w13_EDF2 has last dim {w13_EDF2.shape[2]}; it must be 2F > 0 ([gate | up])")
    F = w13_EDF2.shape[2] // 2
    _check_weight("w2_EFD", w2_EFD, x_ND, E, F, dims=f"F = {F} from w13_EDF2")
    if w2_EFD.shape[2] != D:
        raise ValueError(f"w2_EFD has shape {tuple(w2_EFD.shape)}; its last dim must be D={D}")
    _common.check_device(INTERPRETED, x_sorted_ND=x_ND, w13_EDF2=w13_EDF2, w2_EFD=w2_EFD, counts_E=counts_E)
    _common.check_counts(counts_E, E, x_ND.shape[0])


def check_grouped_gemm_inputs(x_NK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor) -> None:
    """ValueError unless the inputs of grouped_gemm_triton are consistent."""
    _check_rows(x_NK, counts_E, x_name="x_NK")
    _check_weight("w_EKO", w_EKO, x_NK, counts_E.shape[0], x_NK.shape[1], dims="x_NK @ w_EKO[e]")
    if w_EKO.shape[2] == 0:
        raise ValueError("w_EKO has an empty output dim")
    _common.check_device(INTERPRETED, x_NK=x_NK, w_EKO=w_EKO, counts_E=counts_E)
    _common.check_counts(counts_E, counts_E.shape[0], x_NK.shape[0])


# ---------------------------------------------------------------- ops: grouped GEMM

@torch.library.custom_op("moe_kernels::grouped_gemm", mutates_args=())
def _grouped_gemm_op(x_NK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    check_grouped_gemm_inputs(x_NK, w_EKO, counts_E)
    return _launch_grouped_gemm(x_NK, w_EKO, counts_E)


@_grouped_gemm_op.register_fake
def _(x_NK, w_EKO, counts_E):
    return x_NK.new_empty(x_NK.shape[0], w_EKO.shape[2])


@torch.library.custom_op("moe_kernels::grouped_gemm_bwd", mutates_args=())
def _grouped_gemm_bwd_op(dy_NO: torch.Tensor, x_NK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor,
                         need_dx: bool, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dx = _launch_grouped_gemm(dy_NO, w_EKO.transpose(1, 2), counts_E) if need_dx else x_NK.new_empty(0)
    dw = _launch_wgrad(x_NK, dy_NO, counts_E, w_EKO.dtype) if need_dw else w_EKO.new_empty(0)
    return dx, dw


@_grouped_gemm_bwd_op.register_fake
def _(dy_NO, x_NK, w_EKO, counts_E, need_dx, need_dw):
    return (torch.empty_like(x_NK) if need_dx else x_NK.new_empty(0),
            torch.empty_like(w_EKO) if need_dw else w_EKO.new_empty(0))


def _grouped_gemm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_gemm_backward(ctx, dy_NO):
    x_NK, w_EKO, counts_E = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.moe_kernels.grouped_gemm_bwd(dy_NO, x_NK, w_EKO, counts_E, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None


_grouped_gemm_op.register_autograd(_grouped_gemm_backward, setup_context=_grouped_gemm_setup)


def grouped_gemm_triton(x_NK: torch.Tensor, w_EKO: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """out[rows of expert e] = x[rows of expert e] @ w[e]. Differentiable in x and w.

    x_NK: [N, K] rows grouped by expert in expert order; w_EKO: [E, K, O] same dtype (fp32, bf16,
    fp16); counts_E: [E] int32/int64 rows per expert on the same device, sum == N. Returns [N, O].
    """
    return torch.ops.moe_kernels.grouped_gemm(x_NK, w_EKO, counts_E)


# ---------------------------------------------------------------- ops: fused SwiGLU expert MLP

@torch.library.custom_op("moe_kernels::grouped_mlp_fwd", mutates_args=())
def _grouped_mlp_fwd_op(x_ND: torch.Tensor, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor, counts_E: torch.Tensor,
                        save_h: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y_ND, h_NF2); h is the pre-activation kept for the backward, empty unless save_h."""
    check_grouped_mlp_inputs(x_ND, w13_EDF2, w2_EFD, counts_E)
    a_NF, h_NF2 = _launch_swiglu_gemm(x_ND, w13_EDF2, counts_E, store_h=save_h)
    return _launch_grouped_gemm(a_NF, w2_EFD, counts_E), h_NF2


@_grouped_mlp_fwd_op.register_fake
def _(x_ND, w13_EDF2, w2_EFD, counts_E, save_h):
    rows = x_ND.shape[0] if save_h else 0
    return torch.empty_like(x_ND), x_ND.new_empty(rows, w13_EDF2.shape[2])


@torch.library.custom_op("moe_kernels::grouped_mlp_bwd", mutates_args=())
def _grouped_mlp_bwd_op(dy_ND: torch.Tensor, x_ND: torch.Tensor, h_NF2: torch.Tensor, w13_EDF2: torch.Tensor,
                        w2_EFD: torch.Tensor, counts_E: torch.Tensor, need_dx: bool,
                        need_dw: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx_ND, dw13_EDF2, dw2_EFD); a gradient not asked for comes back empty."""
    # 1. dA = dY W2^T, epilogue -> dH and the recomputed activation a
    dh_NF2, a_NF = _launch_grouped_gemm(dy_ND, w2_EFD.transpose(1, 2), counts_E, swiglu_h_NF2=h_NF2)
    # 2. dX = dH W13^T;  3. weight gradients per expert
    dx = _launch_grouped_gemm(dh_NF2, w13_EDF2.transpose(1, 2), counts_E) if need_dx else x_ND.new_empty(0)
    if not need_dw:
        return dx, w13_EDF2.new_empty(0), w2_EFD.new_empty(0)
    dw13 = _launch_wgrad(x_ND, dh_NF2, counts_E, w13_EDF2.dtype)
    dw2 = _launch_wgrad(a_NF, dy_ND, counts_E, w2_EFD.dtype)
    return dx, dw13, dw2


@_grouped_mlp_bwd_op.register_fake
def _(dy_ND, x_ND, h_NF2, w13_EDF2, w2_EFD, counts_E, need_dx, need_dw):
    return (torch.empty_like(x_ND) if need_dx else x_ND.new_empty(0),
            torch.empty_like(w13_EDF2) if need_dw else w13_EDF2.new_empty(0),
            torch.empty_like(w2_EFD) if need_dw else w2_EFD.new_empty(0))


def _grouped_mlp_setup(ctx, inputs, output):
    x_ND, w13_EDF2, w2_EFD, counts_E, _save_h = inputs
    h_NF2 = output[1]
    ctx.mark_non_differentiable(h_NF2)  # an internal residual, not a result
    ctx.save_for_backward(x_ND, h_NF2, w13_EDF2, w2_EFD, counts_E)


def _grouped_mlp_backward(ctx, dy_ND, _dh_unused):
    x_ND, h_NF2, w13_EDF2, w2_EFD, counts_E = ctx.saved_tensors
    need_dx = ctx.needs_input_grad[0]
    need_dw = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    if h_NF2.shape[0] != x_ND.shape[0]:
        raise RuntimeError("grouped_mlp_fwd ran with save_h=False, so it has no backward; "
                           "call grouped_mlp_triton, which saves h whenever a gradient is needed")
    dx, dw13, dw2 = torch.ops.moe_kernels.grouped_mlp_bwd(dy_ND, x_ND, h_NF2, w13_EDF2, w2_EFD, counts_E,
                                                          need_dx, need_dw)
    return ((dx if need_dx else None), (dw13 if ctx.needs_input_grad[1] else None),
            (dw2 if ctx.needs_input_grad[2] else None), None, None)


_grouped_mlp_fwd_op.register_autograd(_grouped_mlp_backward, setup_context=_grouped_mlp_setup)


def grouped_mlp_triton(x_sorted_ND: torch.Tensor, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor,
                       counts_E: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert MLP, y = (silu(x W_gate[e]) * (x W_up[e])) W2[e], over rows sorted by expert.

    x_sorted_ND: [N, D] rows grouped by expert in expert order; w13_EDF2: [E, D, 2F] = [gate | up];
    w2_EFD: [E, F, D]; all one dtype (fp32, bf16 or fp16), contiguous, on one device.
    counts_E: [E] int32/int64 rows per expert, sum == N (checked without a host sync on CUDA).
    Returns y_ND [N, D]. Differentiable in x, w13 and w2 (fp32 accumulation throughout).
    """
    grads = any(getattr(t, "requires_grad", False) for t in (x_sorted_ND, w13_EDF2, w2_EFD))
    y_ND, _h = torch.ops.moe_kernels.grouped_mlp_fwd(x_sorted_ND, w13_EDF2, w2_EFD, counts_E,
                                                     grads and torch.is_grad_enabled())
    return y_ND


__all__ = ["grouped_gemm_triton", "grouped_mlp_triton", "check_grouped_mlp_inputs", "check_grouped_gemm_inputs"]
