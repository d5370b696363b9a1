"""Token permutation: gather rows into expert order, and the weighted scatter-add back.

(Not named kernels/permute.py: importing a submodule `kernels.permute` would rebind the package
attribute `kernels.permute`, the public function, to the module.)

Legend: T tokens, N routed rows (T*K, fewer if dropped), D model dim, K top-k.

    permute_triton(x_TD, token_idx_N)                           == reference.permute_reference
    unpermute_triton(y_ND, token_idx_N, weight_N, num_tokens)   == reference.unpermute_reference

The scatter-add is computed as a gather per token: token_idx_N is sorted on the device (no host
sync) into segments, one per token, and each program sums its token's rows in fp32. No atomics, so
the result is deterministic, every output row is written (a token without rows gets zeros), and
bf16 outputs are rounded once. Backward:
    permute:   dx = unpermute(dy, token_idx, weight=1)       (segment sum)
    unpermute: dy[n] = w[n] * dout[token_idx[n]],  dw[n] = <dout[token_idx[n]], y[n]>   (one gather kernel)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_runtime.kernels import _common
from moe_runtime.kernels._common import round_to

INTERPRETED = _common.interpreting()  # triton.jit reads TRITON_INTERPRET when the kernels below are defined


# src_ptr    [T, D] dtype        rows to gather (x forward, dOut for unpermute's backward); row stride stride_s
# idx_ptr    [N] int32/int64     source row of each output row, in [0, T)
# out_ptr    [N, D] dtype        contiguous; out[n] = src[idx[n]], times w[n] if HAS_WEIGHT
# w_ptr      [N] float           HAS_WEIGHT: row weights, rounded to dtype before use (as the reference does)
# y_ptr      [N, D] dtype        HAS_WEIGHT: the forward input of unpermute, contiguous
# dw_ptr     [N] w dtype         HAS_WEIGHT: dw[n] = sum_d src[idx[n], d] * y[n, d], accumulated in fp32
# N, D, T    int                 rows, row width, source rows
# BLOCK_R, BLOCK_D constexpr     rows per program, columns per step of the loop over D
# INTERPRETER constexpr          running in the Triton interpreter (see _common.round_to)
@triton.jit
def _gather_rows_kernel(src_ptr, idx_ptr, out_ptr, w_ptr, y_ptr, dw_ptr, N, D, T, stride_s,
                        HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                        INTERPRETER: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    src = tl.load(idx_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    row_ok = row_ok & (src >= 0) & (src < T)  # out-of-range indices (caught by the launcher) read nothing
    cols = tl.arange(0, BLOCK_D)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        w = round_to(w, out_ptr.dtype.element_ty, INTERPRETER).to(tl.float32)
        dw = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        mask = row_ok[:, None] & ((d0 + cols) < D)[None, :]
        g = tl.load(src_ptr + src[:, None] * stride_s + (d0 + cols)[None, :], mask=mask, other=0.0)
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * D + (d0 + cols)[None, :]
        if HAS_WEIGHT:
            y = tl.load(y_ptr + rows.to(tl.int64)[:, None] * D + (d0 + cols)[None, :], mask=mask, other=0.0)
            dw += tl.sum(g.to(tl.float32) * y.to(tl.float32), axis=1)
            tl.store(out_ptrs, round_to(w[:, None] * g.to(tl.float32), out_ptr.dtype.element_ty, INTERPRETER),
                     mask=mask)
        else:
            tl.store(out_ptrs, g, mask=mask)
    if HAS_WEIGHT:
        tl.store(dw_ptr + rows, round_to(dw, dw_ptr.dtype.element_ty, INTERPRETER), mask=rows < N)


# src_ptr    [N, D] dtype        contiguous rows to combine (y forward, dy for permute's backward)
# order_ptr  [N] int64           rows sorted by destination token (stable): segment t is order[seg[t]:seg[t+1]]
# seg_ptr    [T + 1] int64       segment offsets into order
# w_ptr      [N] float           HAS_WEIGHT: row weights, rounded to dtype before use (as the reference does)
# out_ptr    [T, D] dtype        contiguous; out[t] = sum over rows n of token t of w[n] * src[n]
# D          int                 row width
# BLOCK_D    constexpr           columns per program; grid: (T, cdiv(D, BLOCK_D))
# INTERPRETER constexpr          running in the Triton interpreter (see _common.round_to)
@triton.jit
def _segment_sum_kernel(src_ptr, order_ptr, seg_ptr, w_ptr, out_ptr, D,
                        HAS_WEIGHT: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRETER: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(tl.load(seg_ptr + t).to(tl.int32), tl.load(seg_ptr + t + 1).to(tl.int32)):
        n = tl.load(order_ptr + j)
        row = tl.load(src_ptr + n * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w = round_to(tl.load(w_ptr + n).to(tl.float32), out_ptr.dtype.element_ty, INTERPRETER)
            row *= w.to(tl.float32)
        acc += row
    out = round_to(acc, out_ptr.dtype.element_ty, INTERPRETER)
    tl.store(out_ptr + t.to(tl.int64) * D + cols, out, mask=col_ok)


def _block_d(D: int, gpu_cap: int) -> int:
    # the interpreter's cost is per program and per op, so small blocks there also exercise the loops
    return 32 if INTERPRETED else min(gpu_cap, triton.next_power_of_2(D))


# ---------------------------------------------------------------- launchers

def _launch_gather(src_TD: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor | None = None,
                   y_ND: torch.Tensor | None = None):
    """src[token_idx] (forward permute); with weight and y: (w * src[token_idx], <src[token_idx], y>)."""
    N, (T, D) = token_idx_N.shape[0], src_TD.shape
    out_ND = _common.empty_output((N, D), src_TD)
    has_weight = weight_N is not None
    dw_N = _common.empty_output((N,), weight_N) if has_weight else out_ND
    if N > 0:
        block_r = 16 if INTERPRETED else 4
        _gather_rows_kernel[(triton.cdiv(N, block_r),)](
            src_TD, token_idx_N, out_ND, weight_N if has_weight else out_ND, y_ND if has_weight else out_ND,
            dw_N, N, D, T, src_TD.stride(0), HAS_WEIGHT=has_weight, BLOCK_R=block_r,
            BLOCK_D=_block_d(D, 512), INTERPRETER=INTERPRETED, num_warps=4)
    return (out_ND, dw_N) if has_weight else out_ND


def _launch_segment_sum(src_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor | None,
                        num_tokens: int) -> torch.Tensor:
    """out[t] = sum of (w[n] *) src[n] over the rows n with token_idx[n] == t; zeros for a token without rows."""
    N, D = src_ND.shape
    out_TD = _common.empty_output((num_tokens, D), src_ND)
    if num_tokens == 0:
        return out_TD
    # segments by token, on the device: a stable sort and a binary search, no host sync
    sorted_tok_N, order_N = torch.sort(token_idx_N, stable=True)
    seg_T1 = torch.searchsorted(sorted_tok_N, torch.arange(num_tokens + 1, device=src_ND.device,
                                                           dtype=sorted_tok_N.dtype))
    block_d = _block_d(D, 1024)
    _segment_sum_kernel[(num_tokens, triton.cdiv(D, block_d))](
        src_ND, order_N, seg_T1, weight_N if weight_N is not None else src_ND, out_TD, D,
        HAS_WEIGHT=weight_N is not None, BLOCK_D=block_d, INTERPRETER=INTERPRETED, num_warps=4)
    return out_TD


# ---------------------------------------------------------------- input checks

def check_permute_inputs(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> None:
    """ValueError unless the inputs of permute_triton are consistent."""
    _common.check_matrix("x_TD", x_TD)
    _common.check_index("token_idx_N", token_idx_N)
    _common.check_device(INTERPRETED, x_TD=x_TD, token_idx_N=token_idx_N)
    _common.check_indices_in_range("token_idx_N", token_idx_N, x_TD.shape[0])


def check_unpermute_inputs(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor | None,
                           num_tokens: int) -> None:
    """ValueError unless the inputs of unpermute_triton are consistent."""
    _common.check_matrix("y_ND", y_ND)
    _common.check_index("token_idx_N", token_idx_N, y_ND.shape[0])
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens!r} must be a non-negative int (rows of the output)")
    tensors = dict(y_ND=y_ND, token_idx_N=token_idx_N)
    if weight_N is not None:
        _common.check_vector("weight_N", weight_N, _common.FLOAT_DTYPES, y_ND.shape[0])
        tensors["weight_N"] = weight_N
    _common.check_device(INTERPRETED, **tensors)
    _common.check_indices_in_range("token_idx_N", token_idx_N, num_tokens)


# ---------------------------------------------------------------- ops

@torch.library.custom_op("moe_kernels::permute", mutates_args=())
def _permute_op(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    check_permute_inputs(x_TD, token_idx_N)
    return _launch_gather(x_TD, token_idx_N)


@_permute_op.register_fake
def _(x_TD, token_idx_N):
    return x_TD.new_empty(token_idx_N.shape[0], x_TD.shape[1])


def _permute_setup(ctx, inputs, output):
    x_TD, token_idx_N = inputs
    ctx.num_tokens = x_TD.shape[0]
    ctx.save_for_backward(token_idx_N)


def _permute_backward(ctx, dy_ND):
    (token_idx_N,) = ctx.saved_tensors
    return torch.ops.moe_kernels.unpermute(dy_ND.contiguous(), token_idx_N, None, ctx.num_tokens), None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("moe_kernels::unpermute", mutates_args=())
def _unpermute_op(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor | None,
                  num_tokens: int) -> torch.Tensor:
    check_unpermute_inputs(y_ND, token_idx_N, weight_N, num_tokens)
    return _launch_segment_sum(y_ND, token_idx_N, weight_N, num_tokens)


@_unpermute_op.register_fake
def _(y_ND, token_idx_N, weight_N, num_tokens):
    return y_ND.new_empty(num_tokens, y_ND.shape[1])


@torch.library.custom_op("moe_kernels::unpermute_bwd", mutates_args=())
def _unpermute_bwd_op(dout_TD: torch.Tensor, y_ND: torch.Tensor, token_idx_N: torch.Tensor,
                      weight_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dy_ND, dweight_N) of unpermute with weights."""
    return _launch_gather(dout_TD, token_idx_N, weight_N, y_ND)


@_unpermute_bwd_op.register_fake
def _(dout_TD, y_ND, token_idx_N, weight_N):
    return torch.empty_like(y_ND), torch.empty_like(weight_N)


def _unpermute_setup(ctx, inputs, output):
    y_ND, token_idx_N, weight_N, _num_tokens = inputs
    ctx.has_weight = weight_N is not None
    ctx.save_for_backward(y_ND, token_idx_N, weight_N)


def _unpermute_backward(ctx, dout_TD):
    y_ND, token_idx_N, weight_N = ctx.saved_tensors
    dout_TD = dout_TD.contiguous()
    if not ctx.has_weight:
        return torch.ops.moe_kernels.permute(dout_TD, token_idx_N), None, None, None
    dy_ND, dw_N = torch.ops.moe_kernels.unpermute_bwd(dout_TD, y_ND, token_idx_N, weight_N)
    return dy_ND, None, dw_N, None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


def permute_triton(x_TD: torch.Tensor, token_idx_N: torch.Tensor) -> torch.Tensor:
    """Gather: row n of the result is x[token_idx[n]]. Differentiable in x.

    x_TD: [T, D] contiguous fp32/bf16/fp16; token_idx_N: [N] int32/int64 in [0, T). Returns [N, D].
    """
    return torch.ops.moe_kernels.permute(x_TD, token_idx_N)


def unpermute_triton(y_ND: torch.Tensor, token_idx_N: torch.Tensor, weight_N: torch.Tensor,
                     num_tokens: int) -> torch.Tensor:
    """Weighted scatter-add: out[token_idx[n]] += weight[n] * y[n]. Differentiable in y and weight.

    y_ND: [N, D] contiguous fp32/bf16/fp16; token_idx_N: [N] int32/int64 in [0, num_tokens);
    weight_N: [N] any float dtype (rounded to y's dtype, like the reference). Returns [num_tokens, D]
    in y's dtype, accumulated in fp32; a token that no row points at gets zeros.
    """
    if weight_N is None:
        raise ValueError("weight_N is required; pass torch.ones(N) for an unweighted sum")
    return torch.ops.moe_kernels.unpermute(y_ND, token_idx_N, weight_N, num_tokens)


__all__ = ["permute_triton", "unpermute_triton", "check_permute_inputs", "check_unpermute_inputs"]
