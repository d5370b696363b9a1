"""Triton kernels of the grouped GEMM and the fused SwiGLU expert MLP (launchers: kernels/grouped_gemm.py).

Legend: N routed rows sorted by expert, D model dim, F expert hidden dim, E experts,
K a GEMM's reduction dim, O its output dim, P x Q a weight gradient's dims.

Row schedule, shared by the row-tiled kernels: a tile of BLOCK_M rows never straddles two experts.
Expert e owns cdiv(counts[e], BLOCK_M) tiles, and their total is at most cdiv(N, BLOCK_M) + min(E, N), so the
launcher sizes the grid by that bound from host ints and each program maps its tile id to
(expert, rows) from counts_E in device memory (one vector load and a prefix sum of E entries).
No host sync, one launch for all experts, CUDA-graph capturable; programs past the last tile exit.
Accumulation is fp32; products are rounded to the input dtype only when stored.
"""
from __future__ import annotations

import triton
import triton.language as tl

from moe_runtime.kernels._common import interpreting, round_to

INTERPRETED = interpreting()  # triton.jit reads TRITON_INTERPRET when the kernels below are defined


def _configs(names: tuple[str, ...], gpu: list[tuple], interp: tuple) -> list[triton.Config]:
    """Autotune candidates: a short list tuned for H100 bf16/fp16, one small config in the interpreter
    (it has no timer worth tuning on, and every extra config re-runs a slow kernel)."""
    rows = [interp] if INTERPRETED else gpu
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


_ROW_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
#             BLOCK_M BLOCK_N BLOCK_K GROUP_M warps stages
_GEMM_CONFIGS = _configs(_ROW_TILE_NAMES, [
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
    (16, 128, 128, 1, 4, 4),   # decode: a handful of rows per expert
], interp=(16, 32, 32, 4, 4, 1))
# the SwiGLU kernel holds two accumulators (gate and up), so its BLOCK_N is half the GEMM's
_SWIGLU_CONFIGS = _configs(_ROW_TILE_NAMES, [
    (128, 128, 64, 8, 8, 3),
    (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (64, 64, 64, 8, 4, 4),
    (16, 64, 128, 1, 4, 4),
], interp=(16, 32, 32, 4, 4, 1))
#             BLOCK_P BLOCK_Q BLOCK_M warps stages
_WGRAD_CONFIGS = _configs(("BLOCK_P", "BLOCK_Q", "BLOCK_M"), [
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
], interp=(32, 32, 16, 4, 1))


def row_tile_bound(N: int, E: int, block_m: int) -> int:
    """Host twin of _num_row_tiles: the grid's row-tile count, from shapes only."""
    return triton.cdiv(N, block_m) + min(E, N)


@triton.jit
def _num_row_tiles(N, E, BLOCK_M: tl.constexpr):
    """Upper bound on the row tiles of all experts: sum_e cdiv(c_e, BLOCK_M) <= cdiv(N, BLOCK_M) + (non-empty
    experts), and at most min(E, N) experts are non-empty. Mirrored by row_tile_bound() for the grid."""
    return (N + BLOCK_M - 1) // BLOCK_M + tl.minimum(E, N)


@triton.jit
def _tile_rows(counts_ptr, N, E, tile_m, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(expert, first row, end row) of the tile_m-th row tile over all experts; expert >= E past the last tile."""
    offs_e = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    e = tl.sum((tl.cumsum(tiles, 0) <= tile_m).to(tl.int32), 0)
    before = offs_e < e
    first_tile = tl.sum(tl.where(before, tiles, 0), 0)
    first_row = tl.sum(tl.where(before, cnt, 0), 0)
    cnt_e = tl.load(counts_ptr + e, mask=e < E, other=0).to(tl.int32)
    # clamp to N: counts that overshoot N (caught by the launcher's check) must not address memory
    return e, first_row + (tile_m - first_tile) * BLOCK_M, tl.minimum(first_row + cnt_e, N)


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles at a time so their weights stay in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size, (pid % width) // size


@triton.jit
def _mma(a, b, acc, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    if INTERPRETER:  # the interpreter's bf16 dot is wrong (numpy has no bf16); fp32 products are exact
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _silu_mul(g, u):
    """silu(g) * u in fp32 (the forward and the backward's recomputation share it, bit for bit)."""
    return g * tl.sigmoid(g) * u


# x_ptr      [N, D] x.dtype      rows sorted by expert; strides (stride_xm, stride_xk)
# w_ptr      [E, D, 2F] x.dtype  w13: columns [0, F) gate, [F, 2F) up; strides (stride_we, stride_wk, stride_wn)
# counts_ptr [E] int32/int64     rows per expert, sum == N
# h_ptr      [N, 2F] x.dtype     contiguous; written iff STORE_H: pre-activation [gate | up] for the backward
# a_ptr      [N, F] x.dtype      contiguous; silu(gate) * up
# N, D, F, E int                 rows, reduction dim, hidden dim, experts
# M_HINT     int                 autotune key only (power-of-two mean rows per expert)
# BLOCK_M/N/K constexpr          tile: rows, hidden columns (each of gate and up), reduction
# BLOCK_E    constexpr           power of two >= E; GROUP_M: row tiles per L2 swizzle group
# INTERPRETER constexpr          running in the Triton interpreter: emulate the GPU's bf16 numerics there
# PRECISION  constexpr           tl.dot input precision ("ieee" for fp32 with TF32 off, else "tf32")
# (STORE_H stays out of the autotune key: training and inference then share a config and compute
# the same bits)
@triton.autotune(configs=_SWIGLU_CONFIGS, key=["D", "F", "M_HINT"])
@triton.jit
def _swiglu_gemm_kernel(x_ptr, w_ptr, counts_ptr, h_ptr, a_ptr, N, D, F, E, M_HINT,
                        stride_xm, stride_xk, stride_we, stride_wk, stride_wn,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr, STORE_H: tl.constexpr,
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
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm + ks[None, :] * stride_xk
    w_ptrs = w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = (k0 + ks) < D
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        acc_g = _mma(x, tl.load(w_ptrs, mask=w_mask, other=0.0), acc_g, INTERPRETER, PRECISION)
        acc_u = _mma(x, tl.load(w_ptrs + F * stride_wn, mask=w_mask, other=0.0), acc_u, INTERPRETER, PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    # round h to the input dtype before the activation, as the reference does: the backward
    # recomputes a from the stored h and then sees exactly the a used here
    g = round_to(acc_g, a_ptr.dtype.element_ty, INTERPRETER)
    u = round_to(acc_u, a_ptr.dtype.element_ty, INTERPRETER)
    out_mask = row_ok[:, None] & col_ok[None, :]
    if STORE_H:
        h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * (2 * F) + cols[None, :]
        tl.store(h_ptrs, g, mask=out_mask)
        tl.store(h_ptrs + F, u, mask=out_mask)
    a = _silu_mul(g.to(tl.float32), u.to(tl.float32))
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * F + cols[None, :]
    tl.store(a_ptrs, round_to(a, a_ptr.dtype.element_ty, INTERPRETER), mask=out_mask)


# a_ptr      [N, K] dtype        rows sorted by expert; any strides (stride_am, stride_ak)
# b_ptr      [E, K, O] dtype     per-expert right operand; any strides (stride_be, stride_bk, stride_bo), so a
#                                transposed weight arrives as a view
# counts_ptr [E] int32/int64     rows per expert, sum == N
# c_ptr      EPILOGUE 0: [N, O] dtype, strides (stride_cm, stride_co): c = a @ b[e]
#            EPILOGUE 1: [N, 2O] dtype contiguous: dH = d[gate | up], where a @ b[e] = dA and O == F
# h_ptr      EPILOGUE 1: [N, 2O] dtype contiguous, forward pre-activation [gate | up]; else unused
# act_ptr    EPILOGUE 1: [N, O] dtype contiguous, written with silu(gate) * up (for dW2); else unused
# N, K, O, E int; M_HINT int     rows, reduction dim, output dim, experts; autotune key only
# BLOCK_M/N/K constexpr          tile: rows, output columns, reduction
# BLOCK_E, GROUP_M, INTERPRETER, PRECISION constexpr: as in _swiglu_gemm_kernel
@triton.autotune(configs=_GEMM_CONFIGS, key=["K", "O", "M_HINT", "EPILOGUE"])
@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, counts_ptr, c_ptr, h_ptr, act_ptr, N, K, O, E, M_HINT,
                         stride_am, stride_ak, stride_be, stride_bk, stride_bo, stride_cm, stride_co,
                         EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
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
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, INTERPRETER, PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    out_mask = row_ok[:, None] & col_ok[None, :]
    if EPILOGUE == 1:
        # SwiGLU backward: with s = sigmoid(g), d silu(g)/dg = s * (1 + g * (1 - s))
        hp = rows.to(tl.int64)[:, None] * (2 * O) + cols[None, :]
        g = tl.load(h_ptr + hp, mask=out_mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + hp + O, mask=out_mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        dtype = c_ptr.dtype.element_ty
        tl.store(c_ptr + hp, round_to(acc * u * s * (1.0 + g * (1.0 - s)), dtype, INTERPRETER), mask=out_mask)
        tl.store(c_ptr + hp + O, round_to(acc * g * s, dtype, INTERPRETER), mask=out_mask)
        tl.store(act_ptr + rows.to(tl.int64)[:, None] * O + cols[None, :],
                 round_to(_silu_mul(g, u), dtype, INTERPRETER), mask=out_mask)
    else:
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_co
        tl.store(c_ptrs, round_to(acc, c_ptr.dtype.element_ty, INTERPRETER), mask=out_mask)


# a_ptr      [N, P] dtype        left operand (x or the activation a), rows sorted by expert;
#                                strides (stride_am, stride_ap)
# b_ptr      [N, Q] dtype        right operand, same rows (dH or dY); strides (stride_bm, stride_bq)
# counts_ptr [E] int32/int64     rows per expert, sum == N
# c_ptr      [E, P, Q] out dtype contiguous: c[e] = a_e^T @ b_e, zeros for an expert without rows
# N, P, Q, E int; M_HINT int     rows, output dims, experts; autotune key only
# BLOCK_P/Q constexpr            output tile; BLOCK_M: rows per step of the loop over the expert's rows
# BLOCK_E, INTERPRETER, PRECISION constexpr: as in _swiglu_gemm_kernel
# grid: (cdiv(P, BLOCK_P) * cdiv(Q, BLOCK_Q), E)
@triton.autotune(configs=_WGRAD_CONFIGS, key=["P", "Q", "M_HINT"])
@triton.jit
def _grouped_wgrad_kernel(a_ptr, b_ptr, counts_ptr, c_ptr, N, P, Q, E, M_HINT,
                          stride_am, stride_ap, stride_bm, stride_bq,
                          BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_E: tl.constexpr, INTERPRETER: tl.constexpr, PRECISION: tl.constexpr):
    e = tl.program_id(1)
    num_q = (Q + BLOCK_Q - 1) // BLOCK_Q
    tile_p, tile_q = tl.program_id(0) // num_q, tl.program_id(0) % num_q
    offs_e = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)
    start = tl.minimum(tl.sum(tl.where(offs_e < e, cnt, 0), 0), N)
    end = tl.minimum(start + tl.load(counts_ptr + e).to(tl.int32), N)
    ps = tile_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tile_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ms = tl.arange(0, BLOCK_M)
    p_ok, q_ok = ps < P, qs < Q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + ms
        ok = rows < end
        # a_e^T tile loaded transposed ([BLOCK_P, BLOCK_M]) straight from the row-major rows
        at = tl.load(a_ptr + rows.to(tl.int64)[None, :] * stride_am + ps[:, None] * stride_ap,
                     mask=p_ok[:, None] & ok[None, :], other=0.0)
        b = tl.load(b_ptr + rows.to(tl.int64)[:, None] * stride_bm + qs[None, :] * stride_bq,
                    mask=ok[:, None] & q_ok[None, :], other=0.0)
        acc = _mma(at, b, acc, INTERPRETER, PRECISION)
    c_ptrs = c_ptr + e.to(tl.int64) * P * Q + ps[:, None] * Q + qs[None, :]
    tl.store(c_ptrs, round_to(acc, c_ptr.dtype.element_ty, INTERPRETER), mask=p_ok[:, None] & q_ok[None, :])
