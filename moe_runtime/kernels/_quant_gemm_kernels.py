"""Triton kernels of the grouped SwiGLU expert MLP on quantised weights (launchers: kernels/quant_gemm.py).

Legend: N routed rows sorted by expert, D model dim, F expert hidden dim, E experts, K a GEMM's
reduction dim, O its output dim, G a group along K.

The same row schedule, swizzle and fp32 accumulation as kernels/_grouped_gemm_kernels.py; the only
change is the weight load: each [BLOCK_K, BLOCK_N] tile of W_KO is decoded in registers from the
expert's quantised fields (formats in kernels/quant.py, output-major [O, K'] per expert), so the
weights cross memory at their quantised size and no dequantised copy of an expert or a layer ever
exists in memory. FMT: 0 int8 (per output channel), 1 int4 (group-wise scale + zero), 2 mxfp4.
"""
from __future__ import annotations

import triton
import triton.language as tl

from moe_runtime.kernels._common import round_to
from moe_runtime.kernels._grouped_gemm_kernels import (INTERPRETED, _configs, _mma, _num_row_tiles, _silu_mul,
                                                       _swizzle, _tile_rows)

FMT_CODE = {"int8": 0, "int4": 1, "mxfp4": 2}

_ROW_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
#             BLOCK_M BLOCK_N BLOCK_K GROUP_M warps stages
_QGEMM_CONFIGS = _configs(_ROW_TILE_NAMES, [
    (16, 64, 128, 1, 4, 3),    # decode: a handful of rows per expert, bandwidth-bound
    (16, 128, 128, 1, 4, 3),
    (64, 64, 64, 8, 4, 3),
    (128, 128, 64, 8, 8, 3),
], interp=(16, 16, 32, 4, 4, 1))


@triton.jit
def _load_qtile(q_ptr, s_ptr, z_ptr, e, k, n, mask, stride_qe, stride_qo, stride_se, stride_so,
                FMT: tl.constexpr, GROUP: tl.constexpr):
    """fp32 tile W[k, n] of expert e: k [BLOCK_K, 1] and n [1, BLOCK_N] absolute indices; zeros off mask."""
    e64 = e.to(tl.int64)
    q_base = q_ptr + e64 * stride_qe + n.to(tl.int64) * stride_qo
    s_base = s_ptr + e64 * stride_se + n.to(tl.int64) * stride_so
    if FMT == 0:
        q = tl.load(q_base + k, mask=mask, other=0).to(tl.float32)
        return q * tl.load(s_base + k * 0, mask=mask, other=0.0)  # per output channel
    byte = tl.load(q_base + k // 2, mask=mask, other=0).to(tl.int32)
    code = (byte >> ((k % 2) * 4)) & 0xF
    if FMT == 1:
        g = k // GROUP
        s = tl.load(s_base + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + e64 * stride_se + n.to(tl.int64) * stride_so + g, mask=mask, other=0.0).to(tl.float32)
        return (code.to(tl.float32) - z) * s
    # mxfp4: e2m1 code -> value (bit 3 sign, bits 2..1 exponent, bit 0 mantissa), times 2^(e8m0 - 127)
    sc = tl.load(s_base + k // 32, mask=mask, other=0).to(tl.int32)
    mag = code & 7
    ex = mag >> 1
    man = (mag & 1).to(tl.float32)
    pow2 = ((ex + 126) << 23).to(tl.float32, bitcast=True)  # 2^(ex - 1), exact
    v = tl.where(ex == 0, 0.5 * man, (1.0 + 0.5 * man) * pow2)
    v = tl.where((code & 8) != 0, -v, v)
    # 2^(sc - 127) built from its bits; sc == 0 is the subnormal 2^-127
    scale = tl.where(sc == 0, 0x00400000, sc << 23).to(tl.float32, bitcast=True)
    return v * scale


# x_ptr      [N, D] x.dtype      rows sorted by expert, contiguous
# q_ptr, s_ptr, z_ptr            w13's fields [E, 2F, K'] / [E, 2F, nG] (kernels/quant.py); output channels
#                                [0, F) gate, [F, 2F) up; strides (stride_qe, stride_qo), (stride_se, stride_so);
#                                z_ptr is int4's zero (same strides as the scale), unused otherwise
# counts_ptr [E] int32/int64     rows per expert, sum == N
# a_ptr      [N, F] x.dtype      contiguous; silu(x W_gate) * (x W_up)
# N, D, F, E int; M_HINT         rows, reduction dim, hidden dim, experts; autotune key only
# FMT, GROUP constexpr           format code (FMT_CODE) and int4 group size
# BLOCK_*, GROUP_M, INTERPRETER, PRECISION constexpr: as in _grouped_gemm_kernels._swiglu_gemm_kernel
@triton.autotune(configs=_QGEMM_CONFIGS, key=["D", "F", "M_HINT", "FMT"])
@triton.jit
def _qswiglu_kernel(x_ptr, q_ptr, s_ptr, z_ptr, counts_ptr, a_ptr, N, D, F, E, M_HINT,
                    stride_qe, stride_qo, stride_se, stride_so,
                    FMT: tl.constexpr, GROUP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
                    INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    num_n = (F + BLOCK_N - 1) // BLOCK_N
    tile_m, tile_n = _swizzle(tl.program_id(0), _num_row_tiles(N, E, BLOCK_M), num_n, GROUP_M)
    e, start, end = _tile_rows(counts_ptr, N, E, tile_m, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < end, cols < F
    dtype = a_ptr.dtype.element_ty
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        k_ok = k < D
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        wg = _load_qtile(q_ptr, s_ptr, z_ptr, e, k[:, None], cols[None, :], w_mask, stride_qe, stride_qo,
                         stride_se, stride_so, FMT, GROUP)
        wu = _load_qtile(q_ptr, s_ptr, z_ptr, e, k[:, None], F + cols[None, :], w_mask, stride_qe, stride_qo,
                         stride_se, stride_so, FMT, GROUP)
        # the decoded weight is rounded to the rows' dtype, as dequantise-then-matmul rounds it
        acc_g = _mma(x, round_to(wg, dtype, INTERPRETER), acc_g, INTERPRETER, PRECISION)
        acc_u = _mma(x, round_to(wu, dtype, INTERPRETER), acc_u, INTERPRETER, PRECISION)
    g = round_to(acc_g, dtype, INTERPRETER).to(tl.float32)
    u = round_to(acc_u, dtype, INTERPRETER).to(tl.float32)
    out_mask = row_ok[:, None] & col_ok[None, :]
    tl.store(a_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :],
             round_to(_silu_mul(g, u), dtype, INTERPRETER), mask=out_mask)


# a_ptr      [N, K] dtype        rows sorted by expert, contiguous (the activation, K == F)
# q_ptr, s_ptr, z_ptr            w2's fields [E, O, K'] / [E, O, nG]; strides as in _qswiglu_kernel
# counts_ptr [E] int32/int64     rows per expert, sum == N
# c_ptr      [N, O] dtype        contiguous; a @ W2[e]
# N, K, O, E int; M_HINT; FMT, GROUP, BLOCK_*, ...: as in _qswiglu_kernel
@triton.autotune(configs=_QGEMM_CONFIGS, key=["K", "O", "M_HINT", "FMT"])
@triton.jit
def _qgemm_kernel(a_ptr, q_ptr, s_ptr, z_ptr, counts_ptr, c_ptr, N, K, O, E, M_HINT,
                  stride_qe, stride_qo, stride_se, stride_so,
                  FMT: tl.constexpr, GROUP: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
                  INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    num_n = (O + BLOCK_N - 1) // BLOCK_N
    tile_m, tile_n = _swizzle(tl.program_id(0), _num_row_tiles(N, E, BLOCK_M), num_n, GROUP_M)
    e, start, end = _tile_rows(counts_ptr, N, E, tile_m, BLOCK_M, BLOCK_E)
    if e >= E:
        return
    rows = start + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < end, cols < O
    dtype = c_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w = _load_qtile(q_ptr, s_ptr, z_ptr, e, k[:, None], cols[None, :], k_ok[:, None] & col_ok[None, :],
                        stride_qe, stride_qo, stride_se, stride_so, FMT, GROUP)
        acc = _mma(a, round_to(w, dtype, INTERPRETER), acc, INTERPRETER, PRECISION)
    tl.store(c_ptr + rows.to(tl.int64)[:, None] * O + cols[None, :], round_to(acc, dtype, INTERPRETER),
             mask=row_ok[:, None] & col_ok[None, :])


__all__ = ["FMT_CODE", "INTERPRETED", "_qswiglu_kernel", "_qgemm_kernel"]
