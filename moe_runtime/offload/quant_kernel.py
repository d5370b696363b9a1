"""A C kernel for quantised expert weights on host cores: x @ W straight from int4 / MXFP4 / int8 bytes.

Legend: N token rows, K a weight's reduction dim, O its output dim, G values per group (int4 scale /
zero, MXFP4 block of 32), nG groups, P = nG * G / 2 bytes of a padded row, H = cdiv(K, 2) bytes a row holds.

The weights stay in the store's own layout (kernels/quant.py: output-major rows, two codes a byte,
even k in the low nibble): nothing is converted or copied at load time or per call. Per row and group
the kernel builds the group's 16-entry table of fp32 values (int4: (i - zero) * scale; MXFP4:
e2m1(i) * 2^(e - 127), both exactly kernels/quant.py's decode) and with AVX-512 looks every nibble up
in it with one vpermps (its index uses the low 4 bits, so the low nibble needs no mask); the even and
odd codes of a byte multiply x's even and odd columns (split once per call), so nibbles are never
interleaved. int8 widens 16 codes to fp32 and applies the channel's scale after the sum. Products and
sums are fp32. RR output rows x NN token rows are computed together: each weight byte is read from
memory once per call and decoded once per token tile (up to 8 rows; N = 16 decodes twice). The rows
are short (K / 2 bytes), so the hardware prefetcher barely starts on one: the kernel prefetches the
next tile's rows itself (from L3 this halved the int4 / MXFP4 time on the benchmark machine). x is
split per call, in C, into a chunk-major scratch [chunks, N, 16] so one pointer reaches a chunk of
every token row. Without AVX-512 (or for an int4 group that is not a multiple of 32) a portable C loop
does the same arithmetic; it is slower than quant_host's torch path, which is therefore the default
there (quant_host._kernel_is_fast).
"""
from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

import torch

from moe_runtime.kernels.quant import E2M1_VALUES, QWeight

FMT_CODE = {"int4": 0, "mxfp4": 1, "int8": 2}

_SRC = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* q    [O, H] uint8 codes (int8: int8 [O, K], H = K);  sc: int4 fp16 [O, nG] scales, mxfp4 uint8 [O, nG]
   exponents, int8 fp32 [O];  zr: int4 fp16 [O, nG] zeros (else unused);  lut: mxfp4 fp32 [256, 16]
   e2m1(i) * 2^(e - 127) (else unused);  xe, xo: fp32 x's even / odd columns, zero past K (int8: xe = x
   itself), chunk-major [ldx / 16, N, 16] so one pointer and fixed offsets reach a chunk of every row
   (split_rows below makes them);  y: fp32 [N, ldy], columns o0..o1 written. */
typedef struct { int fmt; const uint8_t* q; long H; const void* sc; const uint16_t* zr; const float* lut;
                 long nG, G; const float* xe; const float* xo; long N; float* y; long ldy; } QA;
#define XI(a, n, j) (((j) >> 4) * (a)->N * 16 + (n) * 16 + ((j) & 15))  /* x column j of row n */
#if defined(__F16C__)
#include <immintrin.h>
static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }  /* IEEE fp16 -> fp32, exact */
#else
static inline float h2f(uint16_t h) {  /* IEEE fp16 -> fp32, exact */
  uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u; float f;
  if (e == 0) { f = (float)m * 5.9604644775390625e-8f; memcpy(&u, &f, 4); u |= s; }
  else u = s | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112) << 23) | (m << 13));
  memcpy(&f, &u, 4); return f;
}
#endif
static inline void table(const QA* a, long o, long g, float* T) {
  if (a->fmt == 0) { float z = h2f(a->zr[o * a->nG + g]), s = h2f(((const uint16_t*)a->sc)[o * a->nG + g]);
                     for (int i = 0; i < 16; i++) T[i] = ((float)i - z) * s; }
  else memcpy(T, a->lut + 16 * (long)((const uint8_t*)a->sc)[o * a->nG + g], 64);
}
static void rows_portable(const QA* a, long o, long n0, long nn) {
  float acc[8], T[16];
  for (int n = 0; n < nn; n++) acc[n] = 0.f;
  if (a->fmt == 2) {
    const int8_t* q = (const int8_t*)a->q + o * a->H;
    for (long k = 0; k < a->H; k++) for (int n = 0; n < nn; n++) acc[n] += (float)q[k] * a->xe[XI(a, n0 + n, k)];
    for (int n = 0; n < nn; n++) a->y[(n0 + n) * a->ldy + o] = acc[n] * ((const float*)a->sc)[o];
    return;
  }
  long gb = a->G / 2;
  for (long g = 0; g < a->nG; g++) {
    table(a, o, g, T);
    long j1 = (g + 1) * gb < a->H ? (g + 1) * gb : a->H;
    for (long j = g * gb; j < j1; j++) {
      uint8_t b = a->q[o * a->H + j]; float lo = T[b & 15], hi = T[b >> 4];
      for (int n = 0; n < nn; n++) acc[n] += lo * a->xe[XI(a, n0 + n, j)] + hi * a->xo[XI(a, n0 + n, j)];
    }
  }
  for (int n = 0; n < nn; n++) a->y[(n0 + n) * a->ldy + o] = acc[n];
}
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
static inline __mmask16 tail(long rem) { return rem >= 16 ? 0xFFFF : rem <= 0 ? 0 : (__mmask16)((1u << rem) - 1); }
/* the group's table in a register: the same fp32 ops as table() (no store-to-load round trip) */
static inline void halves_to_float(const uint16_t* h, float* f, long n) {  /* exact, 16 at a time */
  long i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(f + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + i))));
  for (; i < n; i++) f[i] = h2f(h[i]);
}
static inline __m512 int4_table(float s, float z) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
}
static inline __m512 vtable(const QA* a, long o, long g) {
  long i = o * a->nG + g;
  if (a->fmt == 1) return _mm512_loadu_ps(a->lut + 16 * (long)((const uint8_t*)a->sc)[i]);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(h2f(a->zr[i]))),
                       _mm512_set1_ps(h2f(((const uint16_t*)a->sc)[i])));
}
/* constant-trip loops unrolled, so the RR x NN accumulators stay in registers */
#define U _Pragma("GCC unroll 16")
/* one 16-byte chunk at byte `off` of every row: 32 codes looked up in the group's table, times x */
#ifndef PF_TILES
#define PF_TILES 1  /* prefetch the rows this many tiles ahead: a row is short, so hardware prefetch barely starts */
#endif
#define PREFETCH(p, RR) if (PF_TILES && !(off & 63)) _mm_prefetch((const char*)(p) + PF_TILES * RR * H, _MM_HINT_T0)
#define QCHUNK(LOAD, RR, NN) \
  U for (int r = 0; r < RR; r++) { \
    PREFETCH(qr[r] + off, RR); \
    __m512i v = _mm512_cvtepu8_epi32(LOAD(qr[r] + off)); \
    __m512 lo = _mm512_permutexvar_ps(v, T[r]), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), T[r]); \
    U for (int n = 0; n < NN; n++) { \
      acc[r][n] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xe + n * 16), acc[r][n]); \
      acc[r][n] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xo + n * 16), acc[r][n]); } }
#define LD_FULL(p) _mm_loadu_si128((const __m128i*)(p))
#define LD_TAIL(p) _mm_maskz_loadu_epi8(m, (p))
#define QTILE(RR, NN) \
static void tile_##RR##_##NN(const QA* a, long o, long n0) { \
  __m512 acc[RR][NN], T[RR]; const uint8_t* qr[RR]; const long cs = a->N * 16; \
  const long H = a->H, gb = a->G / 2, nG = a->nG; \
  U for (int r = 0; r < RR; r++) { qr[r] = a->q + (o + r) * H; U for (int n = 0; n < NN; n++) acc[r][n] = _mm512_setzero_ps(); } \
  /* int4: the tile's scales and zeros in fp32 first, so each group's broadcasts are plain loads */ \
  float sz[a->fmt == 0 ? 2 * RR * nG : 1]; \
  if (a->fmt == 0) U for (int r = 0; r < RR; r++) { \
    halves_to_float((const uint16_t*)a->sc + (o + r) * nG, sz + 2 * r * nG, nG); \
    halves_to_float(a->zr + (o + r) * nG, sz + (2 * r + 1) * nG, nG); } \
  for (long g = 0; g < nG; g++) { \
    U for (int r = 0; r < RR; r++) T[r] = a->fmt == 0 ? int4_table(sz[2 * r * nG + g], sz[(2 * r + 1) * nG + g]) \
                                                     : vtable(a, o + r, g); \
    const long end = (g + 1) * gb; \
    const float *xe = a->xe + (g * gb >> 4) * cs + n0 * 16, *xo = a->xo + (g * gb >> 4) * cs + n0 * 16; \
    if (end <= H) { for (long off = g * gb; off < end; off += 16, xe += cs, xo += cs) { QCHUNK(LD_FULL, RR, NN) } } \
    else for (long off = g * gb; off < end; off += 16, xe += cs, xo += cs) { __mmask16 m = tail(H - off); QCHUNK(LD_TAIL, RR, NN) } \
  } \
  U for (int r = 0; r < RR; r++) U for (int n = 0; n < NN; n++) a->y[(n0 + n) * a->ldy + o + r] = _mm512_reduce_add_ps(acc[r][n]); \
}
#define Q8CHUNK(LOAD, XLOAD, RR, NN) \
  U for (int r = 0; r < RR; r++) { \
    PREFETCH(qr[r] + off, RR); \
    __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(LOAD(qr[r] + off))); \
    U for (int n = 0; n < NN; n++) acc[r][n] = _mm512_fmadd_ps(w, XLOAD(xe + n * 16), acc[r][n]); }
#define XL_FULL(p) _mm512_loadu_ps(p)
#define XL_TAIL(p) _mm512_maskz_loadu_ps(m, (p))
#define Q8TILE(RR, NN) \
static void tile8_##RR##_##NN(const QA* a, long o, long n0) { \
  __m512 acc[RR][NN]; const uint8_t* qr[RR]; const long cs = a->N * 16; \
  const long H = a->H; long off = 0; \
  U for (int r = 0; r < RR; r++) { qr[r] = a->q + (o + r) * H; U for (int n = 0; n < NN; n++) acc[r][n] = _mm512_setzero_ps(); } \
  const float* xe = a->xe + n0 * 16; \
  for (; off + 16 <= H; off += 16, xe += cs) { Q8CHUNK(LD_FULL, XL_FULL, RR, NN) } \
  if (off < H) { __mmask16 m = tail(H - off); Q8CHUNK(LD_TAIL, XL_TAIL, RR, NN) } \
  U for (int r = 0; r < RR; r++) U for (int n = 0; n < NN; n++) \
    a->y[(n0 + n) * a->ldy + o + r] = _mm512_reduce_add_ps(acc[r][n]) * ((const float*)a->sc)[o + r]; \
}
#define BOTH(RR, NN) QTILE(RR, NN) Q8TILE(RR, NN)
BOTH(4, 1) BOTH(2, 2) BOTH(2, 4) BOTH(2, 8) BOTH(1, 1) BOTH(1, 2) BOTH(1, 4) BOTH(1, 8)
#ifndef RR_WIDE
#define RR_WIDE 2  /* output rows per tile when N > 1 (1 or 2) */
#endif
typedef void (*tile_fn)(const QA*, long, long);
static void run_avx(const QA* a, long N, long o0, long o1) {
  int i8 = a->fmt == 2;
  for (long o = o0; o < o1;) {
    int rr = o1 - o >= 4 && N == 1 ? 4 : o1 - o >= 2 && RR_WIDE == 2 ? 2 : 1;
    for (long n = 0; n < N;) {
      long r = N - n; int nn = r >= 8 ? 8 : r >= 4 ? 4 : r >= 2 ? 2 : 1;
      tile_fn f;
      if (rr == 4) f = i8 ? tile8_4_1 : tile_4_1;
      else if (rr == 2) f = nn == 8 ? (i8 ? tile8_2_8 : tile_2_8) : nn == 4 ? (i8 ? tile8_2_4 : tile_2_4)
                          : nn == 2 ? (i8 ? tile8_2_2 : tile_2_2) : (i8 ? tile8_1_1 : tile_1_1);
      else f = nn == 8 ? (i8 ? tile8_1_8 : tile_1_8) : nn == 4 ? (i8 ? tile8_1_4 : tile_1_4)
             : nn == 2 ? (i8 ? tile8_1_2 : tile_1_2) : (i8 ? tile8_1_1 : tile_1_1);
      if (rr == 2 && nn == 1) { f(a, o, n); f(a, o + 1, n); } else f(a, o, n);
      n += nn;
    }
    o += rr;
  }
}
int moe_quant_kernel_isa(void) { return 1; }
#else
static void run_avx(const QA* a, long N, long o0, long o1) { (void)a; (void)N; (void)o0; (void)o1; }
int moe_quant_kernel_isa(void) { return 0; }
#endif
/* y[n][o] = sum_k x[n][k] W[k][o] for n < N, o0 <= o < o1 (see QA above); portable = 1 forces the C loop. */
/* x: [N, K] fp32 (x_bf16 = 0) or bf16 (1) rows, contiguous; split here into xe / xo (int8: one padded
   copy), zero past K, in a scratch buffer of this call's own (each worker splits its own: N * K floats). */
static float* split_rows(int fmt, const void* x, int x_bf16, long N, long K, long ldx) {
  long nb = (fmt == 2 ? 1 : 2) * N * ldx;
  float* buf = (float*)calloc((size_t)nb, sizeof(float));
  if (!buf) return 0;
  for (long n = 0; n < N; n++) for (long k = 0; k < K; k++) {
    float v;
    if (x_bf16) { uint32_t u = (uint32_t)((const uint16_t*)x)[n * K + k] << 16; memcpy(&v, &u, 4); }
    else v = ((const float*)x)[n * K + k];
    long j = fmt == 2 ? k : k >> 1;
    buf[(fmt == 2 ? 0 : (k & 1) * N * ldx) + (j >> 4) * N * 16 + n * 16 + (j & 15)] = v;
  }
  return buf;
}
/* y[n][o] = sum_k x[n][k] W[k][o] for n < N, o0 <= o < o1 (see QA above); portable = 1 forces the C
   loop. Returns 0, or -1 when the scratch buffer could not be allocated. */
int moe_quant_matmul(int fmt, const uint8_t* q, long H, const void* sc, const uint16_t* zr, const float* lut,
                     long nG, long G, const void* x, int x_bf16, long N, long K, float* y, long ldy,
                     long o0, long o1, int portable) {
  long ldx = ((fmt == 2 ? K : nG * G / 2) + 15) / 16 * 16;  /* whole chunks */
  float* xs = split_rows(fmt, x, x_bf16, N, K, ldx);
  if (!xs) return -1;
  QA a = {fmt, q, H, sc, zr, lut, nG, G, xs, fmt == 2 ? xs : xs + N * ldx, N, y, ldy};
  if (!portable && moe_quant_kernel_isa() && (fmt != 0 || G % 32 == 0)) run_avx(&a, N, o0, o1);
  else for (long o = o0; o < o1; o++) for (long n = 0; n < N; n += 8) rows_portable(&a, o, n, N - n < 8 ? N - n : 8);
  free(xs);
  return 0;
}
"""


@dataclass(frozen=True)
class QuantKernel:
    lib: ctypes.CDLL
    isa: str
    """'avx512' (vpermps table lookups, fp32 FMA) or 'portable C'."""


def build_quant_kernel(extra_flags: tuple[str, ...] = ()) -> tuple[QuantKernel | None, str]:
    """Compile (cached, cpu_experts.build_c_library: a .so with a sha256 sidecar checked before every
    load) and load the kernel. extra_flags: e.g. ("-mno-avx512f",) builds the portable loop (tests)."""
    from moe_runtime.offload.cpu_experts import build_c_library
    lib, how = build_c_library(_SRC, "quant_kernel", extra_flags)
    if lib is None:
        return None, how
    lib.moe_quant_matmul.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 3 \
        + [ctypes.c_long] * 2 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_void_p] \
        + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.moe_quant_matmul.restype = ctypes.c_int
    lib.moe_quant_kernel_isa.restype = ctypes.c_int
    isa = "avx512" if lib.moe_quant_kernel_isa() else "portable C"
    return QuantKernel(lib, isa), f"C kernel ({isa}, {how})"


@functools.lru_cache(maxsize=1)
def quant_kernel() -> tuple[QuantKernel | None, str]:
    """The process's quantised host kernel, built on first use; MOE_HOST_KERNEL=torch keeps the torch
    path. (kernel, how) or (None, why not)."""
    if os.environ.get("MOE_HOST_KERNEL", "").strip().lower() == "torch":
        return None, "torch (MOE_HOST_KERNEL=torch)"
    return build_quant_kernel()


@functools.lru_cache(maxsize=1)
def _mxfp4_table() -> torch.Tensor:
    """fp32 [256, 16]: row e holds e2m1(i) * 2^(e - 127), computed with kernels/quant.py's own ops
    (torch.ldexp of the e2m1 table) so the kernel's weights equal its decode bit for bit."""
    e2m1 = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return torch.ldexp(e2m1[None, :], (torch.arange(256, dtype=torch.int32) - 127).float()[:, None]).contiguous()


def kernel_quant_linear(x_NK: torch.Tensor, w: QWeight, *, threads: int | None = None,
                        kernel: QuantKernel | None = None, portable: bool = False) -> torch.Tensor:
    """fp32 [N, O] = x_NK @ W_KO for one quantised expert weight (w.n == 1, host tensors), through the C
    kernel; the O columns are split between `threads` workers (default torch.get_num_threads()).
    portable=True runs the portable C loop even where AVX-512 is built (tests)."""
    kernel = kernel or quant_kernel()[0]
    if kernel is None:
        raise RuntimeError(f"the quantised host kernel is not available: {quant_kernel()[1]}")
    if w.n != 1 or x_NK.dim() != 2 or x_NK.shape[1] != w.K or x_NK.device.type != "cpu" \
            or any(t.device.type != "cpu" for t in w.fields.values()):
        raise ValueError(f"kernel_quant_linear needs host rows [N, {w.K}] and one host expert weight; got x "
                         f"{tuple(x_NK.shape)} on {x_NK.device} and a bank of {w.n}")
    N, O = x_NK.shape[0], w.O
    y = torch.empty(N, O, dtype=torch.float32)
    if N == 0 or O == 0:
        return y
    x = x_NK.contiguous() if x_NK.dtype == torch.bfloat16 else x_NK.float().contiguous()
    f = w.fields
    q, sc = f["q"], f["scale"]
    if not all(t.is_contiguous() for t in f.values()):  # the store's expert views are; anything else is copied
        f = {k: v.contiguous() for k, v in f.items()}
    zr = f["zero"].data_ptr() if w.fmt == "int4" else None
    lut = _mxfp4_table().data_ptr() if w.fmt == "mxfp4" else None
    nG, G = (sc.shape[2], w.group if w.fmt == "int4" else 32) if w.fmt != "int8" else (1, w.K)
    args = (FMT_CODE[w.fmt], f["q"].data_ptr(), q.shape[2], f["scale"].data_ptr(), zr, lut, nG, G, x.data_ptr(),
            int(x.dtype == torch.bfloat16), N, w.K, y.data_ptr(), O)
    call = kernel.lib.moe_quant_matmul
    t = max(1, min(threads or torch.get_num_threads(), O // 64))
    if t == 1:
        rcs = [call(*args, 0, O, int(portable))]
    else:  # ctypes drops the GIL for the call: the parts run in parallel, each on its own columns
        from moe_runtime.offload.cpu_experts import _threads
        cuts = [O * i // t // 4 * 4 for i in range(t)] + [O]
        rcs = [fut.result() for fut in [_threads().submit(call, *args, a, b, int(portable))
                                        for a, b in zip(cuts, cuts[1:]) if a < b]]
    if any(rcs):
        raise MemoryError(f"the quantised host kernel could not allocate {N} x {w.K} floats of scratch")
    return y


__all__ = ["QuantKernel", "build_quant_kernel", "quant_kernel", "kernel_quant_linear", "FMT_CODE"]
