"""Cold experts on host cores, and the transfer-vs-compute cost model that decides per miss.

Legend: N token rows routed to one expert, D model dim, F expert hidden dim.

For a miss the engine may (Fiddler / MoNDE): copy the expert's weights to a device slot and run it
there, wait for a copy already in flight, or run the expert on the host with its activations moved
instead. Which is cheapest depends on this machine, so every number comes from a calibration at
start-up: the measured time of one expert copy (store -> slot), the measured time of one expert on
the host and on the device for a grid of token counts, and the measured cost of moving activations.
Nothing here is a constant about hardware.

The host path for bf16 experts at decode batch sizes (N <= HOST_KERNEL_MAX_ROWS) is a small C kernel
(below) that streams the store's weights at near DRAM bandwidth; torch's bf16 matmul is compute-bound
there. Its result equals the plain-PyTorch expert (`expert_forward`) up to bf16 rounding: products are
exact, sums are fp32, and the hidden activations are rounded to bf16 once (torch rounds them three
times). fp32 experts and larger N keep torch's path (MKL's fp32 GEMV already streams; at N > 8 the kernel
reads the weights more than once and torch's GEMM blocking wins).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as tnf

from moe_runtime import kernels
from moe_runtime.core.experts import compute_dtype

DECISIONS = ("wait", "copy", "cpu")


def expert_forward(x_ND: torch.Tensor, w13_DF2: torch.Tensor, w2_FD: torch.Tensor,
                   count_1: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU MLP through the same kernel call ExpertBank makes (a group of one), so
    the result matches the resident model bit for bit where the kernel is the same. count_1: [1]."""
    dtype = compute_dtype(x_ND)
    return kernels.grouped_mlp(x_ND.to(dtype), w13_DF2[None].to(dtype), w2_FD[None].to(dtype), count_1)


def host_expert_forward(x_ND: torch.Tensor, w13_DF2: torch.Tensor, w2_FD: torch.Tensor,
                        count_1_host: torch.Tensor) -> torch.Tensor:
    """Run an expert on host cores from the store's (host) weights; activations move, weights don't.
    bf16 experts at N <= HOST_KERNEL_MAX_ROWS run the C kernel when it is built (host_path())."""
    dtype = compute_dtype(x_ND)
    x_host = x_ND if x_ND.device.type == "cpu" else x_ND.to("cpu", dtype)  # host sync: N activation rows
    if _kernel_applies(x_host, dtype, w13_DF2, w2_FD):
        y_host = kernel_expert_forward(x_host, w13_DF2, w2_FD)
    else:
        y_host = expert_forward(x_host, w13_DF2, w2_FD, count_1_host)
    return y_host if x_ND.device.type == "cpu" else y_host.to(x_ND.device, non_blocking=True)


@dataclass(frozen=True)
class Calibration:
    """Measured at start-up on this machine; JSON-able (recorded in traces and reports)."""

    device: str
    expert_bytes: int
    copy_s: float
    """Seconds to copy one expert from the host store into a device slot."""
    tokens: tuple[int, ...]
    """Token counts of the grid below."""
    host_s: tuple[float, ...]
    """Seconds for one expert on host cores, per grid token count."""
    device_s: tuple[float, ...]
    """Seconds for one expert on the device, per grid token count."""
    act_s_per_token: float
    """Seconds to move one token's activation to the host and its result back (0 when host = device)."""
    attn_s: float = 0.0
    """Seconds of non-expert compute per MoE layer at decode (the window a prefetch can hide in)."""
    host_path: str = "torch"
    """Which host expert path host_s timed (host_path()): the C kernel and its ISA and threads, or torch."""

    @property
    def copy_gbps(self) -> float:
        return self.expert_bytes / max(self.copy_s, 1e-12) / 1e9

    @property
    def host_gbps(self) -> float:
        """Effective weight bandwidth of one host expert run at the grid's smallest token count
        (expert_bytes / host_s[0]): what scales the measured host time to another model's experts."""
        return self.expert_bytes / max(self.host_s[0], 1e-12) / 1e9

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens"], d["host_s"], d["device_s"] = list(self.tokens), list(self.host_s), list(self.device_s)
        d["copy_gbps"], d["host_gbps"] = self.copy_gbps, self.host_gbps
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        return cls(device=str(d["device"]), expert_bytes=int(d["expert_bytes"]), copy_s=float(d["copy_s"]),
                   tokens=tuple(int(t) for t in d["tokens"]), host_s=tuple(float(s) for s in d["host_s"]),
                   device_s=tuple(float(s) for s in d["device_s"]),
                   act_s_per_token=float(d["act_s_per_token"]), attn_s=float(d.get("attn_s", 0.0)),
                   host_path=str(d.get("host_path", "torch")))


def interpolate(grid: tuple[int, ...], values: tuple[float, ...], n: int) -> float:
    """Piecewise-linear in n over the grid, extended linearly past both ends, never negative."""
    if len(grid) == 1:
        return values[0] * n / grid[0]
    i = 1
    while i < len(grid) - 1 and grid[i] < n:
        i += 1
    x0, x1, y0, y1 = grid[i - 1], grid[i], values[i - 1], values[i]
    return max(0.0, y0 + (y1 - y0) * (n - x0) / (x1 - x0))


class CostModel:
    """Chooses, for a miss routed N tokens, between waiting, copying and computing on the host."""

    def __init__(self, cal: Calibration):
        if len(cal.tokens) != len(cal.host_s) or len(cal.tokens) != len(cal.device_s) or not cal.tokens:
            raise ValueError("calibration grid, host_s and device_s must be non-empty and of equal length")
        self.cal = cal

    def host_time(self, n: int) -> float:
        return interpolate(self.cal.tokens, self.cal.host_s, n) + n * self.cal.act_s_per_token

    def device_time(self, n: int) -> float:
        return interpolate(self.cal.tokens, self.cal.device_s, n)

    def decide(self, n: int, inflight_remaining_s: float | None, allow_cpu: bool, *, queued_s: float = 0.0) -> str:
        """'wait' (copy already in flight), 'copy' (fetch now, behind `queued_s` of queued copies)
        or 'cpu' (run on host cores): whichever finishes first."""
        if inflight_remaining_s is not None:
            options = {"wait": inflight_remaining_s + self.device_time(n)}
        else:
            options = {"copy": queued_s + self.cal.copy_s + self.device_time(n)}
        if allow_cpu:
            options["cpu"] = self.host_time(n)
        return min(options, key=options.get)

    def prefers_copy(self, n: int) -> bool:
        return self.cal.copy_s + self.device_time(n) <= self.host_time(n)


def _median_time(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def calibrate(store, pool, copy_engine, *, token_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
              repeats: int = 3, attn_probe: Callable[[], Any] | None = None,
              host_run: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], Any] | None = None,
              device_run: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
              path: str | None = None) -> Calibration:
    """Measure copy, host and device expert times on this machine. Uses slot 0 of an empty pool.
    host_run(x, counts, key) / device_run(x, counts) run one expert on the host from the store / on the
    device from slot 0 (default: the float expert's paths; offload/quant_host.calibrate_store passes
    the quantised ones), `path` names the host path (default: host_path of the store's dtype)."""
    dev = pool.device
    # host sync: calibration must wait for the device to time it (start-up only).
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    def copy_once():
        copy_engine.wait(copy_engine.issue((0, 0), 0))
        copy_engine.synchronize()

    copy_s = _median_time(copy_once, repeats, sync)
    lay = store.layout
    host_s, device_s = [], []
    # Each host run reads another expert, as a miss does: one expert timed back to back would be
    # served from cache wherever it fits in L3.
    keys = itertools.cycle([(m, e) for m in range(lay.num_layers) for e in range(lay.num_experts)])
    if host_run is None:  # the path the engine runs on the host: the C kernel where it applies
        def host_run(x, counts, key):
            return host_expert_forward(x, store.w13(*key), store.w2(*key), counts)
    if device_run is None:
        def device_run(x, counts):
            return expert_forward(x, pool.w13_SDF2[0], pool.w2_SFD[0], counts)
    for n in token_grid:
        xh = torch.randn(n, lay.d_model).to(lay.dtype)
        ch = torch.tensor([n])
        host_s.append(_median_time(lambda: host_run(xh, ch, next(keys)), repeats, sync))
        xd, cd = xh.to(dev), ch.to(dev)
        device_s.append(_median_time(lambda: device_run(xd, cd), repeats, sync))
    act = 0.0
    if dev.type != "cpu":
        xd = torch.randn(token_grid[-1], lay.d_model, dtype=lay.dtype, device=dev)
        act = _median_time(lambda: xd.to("cpu").to(dev), repeats, sync) / token_grid[-1]
    attn_s = _median_time(attn_probe, repeats, sync) if attn_probe is not None else 0.0
    # Calibration copies are not workload traffic.
    copy_engine.collect_stall()
    copy_engine.bytes_moved = copy_engine.copies = 0
    copy_engine.stall_s = 0.0
    return Calibration(device=str(dev), expert_bytes=lay.expert_bytes, copy_s=copy_s, tokens=tuple(token_grid),
                       host_s=tuple(host_s), device_s=tuple(device_s), act_s_per_token=act, attn_s=attn_s,
                       host_path=path if path is not None else host_path(lay.dtype))


# ---------------------------------------------------------------- the host expert kernel
# torch 2.13's bf16 matmul on CPU reads the weights at a fraction of DRAM bandwidth at decode
# batch sizes (oneDNN repacks B for each call; at 1 token it is compute-bound at ~7 GB/s where a
# streaming read gets ~30 on this machine, bench/results/host_experts.md). This kernel reads the
# store's own layout (W13 [D, 2F], W2 [F, D], row-major: no second copy, no repacking) once per
# call: two rows at a time are interleaved in registers and multiplied with AVX512-BF16's
# vdpbf16ps (exact bf16 products, fp32 accumulation), N <= 8 token rows sharing each weight load.
# Without AVX512-BF16 the same blocking runs in portable C (bf16 -> fp32 by a 16-bit shift, fp32
# FMA) that the compiler vectorises. It is built once per machine with the system C compiler and
# loaded with ctypes; with no compiler (or MOE_HOST_KERNEL=torch) the host path stays torch's.
_KERNEL_SRC = r"""
#include <stdint.h>
#include <string.h>
#ifndef TD
#define TD 16
#endif
/* y[n][j0:j1] = sum_d x[n][d] W[d][j0:j1] for n < N; W [D, O] row-major bf16; x [N, ldx] bf16 with
   ldx even and x[n][D] == 0 when D is odd; y [N, O] fp32. Blocks of TD rows x 32 columns. */
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
static inline __m512i pair_rows(const uint16_t* a, const uint16_t* b, __mmask16 m) {
  __m256i va = _mm256_maskz_loadu_epi16(m, a), vb = b ? _mm256_maskz_loadu_epi16(m, b) : _mm256_setzero_si256();
  __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(va), vb, 1);
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
                                       23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, ab); /* a0 b0 a1 b1 ...: the pairs vdpbf16ps multiplies */
}
#define TILE(NN) \
static void tile_##NN(const uint16_t* W, long O, const uint16_t* x, long ldx, float* y, long D, long j0, long j1) { \
  for (long d0 = 0; d0 < D; d0 += TD) { \
    long d1 = d0 + TD < D ? d0 + TD : D; \
    for (long j = j0; j < j1; j += 32) { \
      long r = j1 - j; \
      __mmask16 m0 = r >= 16 ? 0xFFFF : (__mmask16)((1u << r) - 1); \
      __mmask16 m1 = r >= 32 ? 0xFFFF : r <= 16 ? 0 : (__mmask16)((1u << (r - 16)) - 1); \
      __m512 a0[NN], a1[NN]; \
      for (int n = 0; n < NN; n++) { a0[n] = _mm512_maskz_loadu_ps(m0, y + n * O + j); \
                                      a1[n] = _mm512_maskz_loadu_ps(m1, y + n * O + j + 16); } \
      for (long d = d0; d < d1; d += 2) { \
        const uint16_t* wa = W + d * O + j; const uint16_t* wb = d + 1 < d1 ? wa + O : 0; \
        __m512i p0 = pair_rows(wa, wb, m0), p1 = pair_rows(wa + 16, wb ? wb + 16 : 0, m1); \
        for (int n = 0; n < NN; n++) { \
          int32_t xv; memcpy(&xv, x + n * ldx + d, 4); __m512i xp = _mm512_set1_epi32(xv); \
          a0[n] = _mm512_dpbf16_ps(a0[n], (__m512bh)p0, (__m512bh)xp); \
          a1[n] = _mm512_dpbf16_ps(a1[n], (__m512bh)p1, (__m512bh)xp); } \
      } \
      for (int n = 0; n < NN; n++) { _mm512_mask_storeu_ps(y + n * O + j, m0, a0[n]); \
                                      _mm512_mask_storeu_ps(y + n * O + j + 16, m1, a1[n]); } \
    } \
  } \
}
int moe_host_kernel_isa(void) { return 1; }
#else
static inline float bf2f(uint16_t b) { union { uint32_t u; float f; } v; v.u = (uint32_t)b << 16; return v.f; }
#define TILE(NN) \
static void tile_##NN(const uint16_t* W, long O, const uint16_t* x, long ldx, float* y, long D, long j0, long j1) { \
  for (long d0 = 0; d0 < D; d0 += TD) { \
    long d1 = d0 + TD < D ? d0 + TD : D; \
    for (long j = j0; j < j1; j += 32) { \
      long tj = j1 - j < 32 ? j1 - j : 32; \
      float acc[NN][32], wf[32]; \
      for (int n = 0; n < NN; n++) for (long q = 0; q < tj; q++) acc[n][q] = y[n * O + j + q]; \
      for (long d = d0; d < d1; d++) { \
        for (long q = 0; q < tj; q++) wf[q] = bf2f(W[d * O + j + q]); \
        for (int n = 0; n < NN; n++) { float xv = bf2f(x[n * ldx + d]); \
          for (long q = 0; q < tj; q++) acc[n][q] += xv * wf[q]; } \
      } \
      for (int n = 0; n < NN; n++) for (long q = 0; q < tj; q++) y[n * O + j + q] = acc[n][q]; \
    } \
  } \
}
int moe_host_kernel_isa(void) { return 0; }
#endif
TILE(1) TILE(2) TILE(4) TILE(8)
void moe_host_matmul_bf16(const uint16_t* W, const uint16_t* x, long ldx, float* y, long N, long D, long O,
                          long j0, long j1) {
  for (long n = 0; n < N; n++) memset(y + n * O + j0, 0, sizeof(float) * (size_t)(j1 - j0));
  for (long n = 0; n < N;) {
    long r = N - n; const uint16_t* xs = x + n * ldx; float* ys = y + n * O;
    if (r >= 8) { tile_8(W, O, xs, ldx, ys, D, j0, j1); n += 8; }
    else if (r >= 4) { tile_4(W, O, xs, ldx, ys, D, j0, j1); n += 4; }
    else if (r >= 2) { tile_2(W, O, xs, ldx, ys, D, j0, j1); n += 2; }
    else { tile_1(W, O, xs, ldx, ys, D, j0, j1); n += 1; }
  }
}
"""

HOST_KERNEL_MAX_ROWS = 8
"""Token rows up to which the C kernel runs a bf16 expert: its widest tile holds 8 rows, so up to 8
it reads the weights once; at 16 (two passes) torch was faster (bench/results/host_experts.md)."""


@dataclass(frozen=True)
class HostKernel:
    lib: ctypes.CDLL
    isa: str
    """'avx512bf16' (vdpbf16ps) or 'portable C' (compiler-vectorised fp32 FMA)."""
    path: str


def _cache_dir() -> Path:
    root = os.environ.get("MOE_RUNTIME_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moe_runtime")
    return Path(root) / "host_kernel"


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cpu_id() -> str:
    """The CPU's model and feature flags: a kernel built with -march=native is only reused on its CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(next((ln for ln in lines if ln.startswith(k)), "") for k in ("model name", "flags"))
    except OSError:
        return platform.processor() + platform.machine()


def build_c_library(src: str, stem: str, extra_flags: tuple[str, ...] = ()) -> tuple[ctypes.CDLL | None, str]:
    """Compile C source `src` into a shared library (once per source, compiler, flags and CPU; cached
    under MOE_RUNTIME_CACHE or ~/.cache/moe_runtime as <stem>_<key>.so with a sha256 sidecar checked
    before every load) and load it. Returns (library, compiler name) or (None, why not)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None, "no C compiler (cc, gcc or clang) on PATH; set CC to use the host kernel"
    flags = ["-O3", "-march=native", "-fPIC", "-shared", *extra_flags]
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
        key = hashlib.sha256("\0".join([src, cc, version, *flags, _cpu_id()]).encode()).hexdigest()[:20]
        so = _cache_dir() / f"{stem}_{key}.so"
        digest = so.with_name(so.name + ".sha256")  # over the whole library, checked before every load
        if not (so.exists() and digest.exists() and _sha256_file(so) == digest.read_text().strip()):
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
                c_file, out = Path(tmp) / f"{stem}.c", Path(tmp) / f"{stem}.so"
                c_file.write_text(src)
                r = subprocess.run([cc, *flags, str(c_file), "-o", str(out)], capture_output=True, text=True,
                                   timeout=300)
                if r.returncode != 0:
                    lines = r.stderr.strip().splitlines() or ["no message"]
                    last = next((ln for ln in lines if "error" in ln), lines[-1])  # the first error, else the end
                    return None, f"{cc} could not build the {stem} ({last[:200]})"
                (Path(tmp) / "digest").write_text(_sha256_file(out) + "\n")
                # atomic renames, digest first: a concurrent load sees a whole pair or rebuilds
                os.replace(Path(tmp) / "digest", digest)
                os.replace(out, so)
            if _sha256_file(so) != digest.read_text().strip():
                return None, f"{stem} {so} changed while it was being built (a concurrent build?); " \
                             "run again or set MOE_HOST_KERNEL=torch"
        return ctypes.CDLL(str(so)), Path(cc).name
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{stem} unavailable ({type(e).__name__}: {e})"


def build_host_kernel(extra_flags: tuple[str, ...] = ()) -> tuple[HostKernel | None, str]:
    """Compile (cached, build_c_library) and load the bf16 kernel. Returns (kernel, how) or (None, why not)."""
    lib, how = build_c_library(_KERNEL_SRC, "host_kernel", extra_flags)
    if lib is None:
        return None, how
    lib.moe_host_matmul_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p] \
        + [ctypes.c_long] * 5
    lib.moe_host_matmul_bf16.restype = None
    lib.moe_host_kernel_isa.restype = ctypes.c_int
    isa = "avx512bf16" if lib.moe_host_kernel_isa() else "portable C"
    return HostKernel(lib, isa, lib._name), f"C kernel ({isa}, {how})"


@functools.lru_cache(maxsize=1)
def host_kernel() -> tuple[HostKernel | None, str]:
    """The process's host kernel, built on first use; MOE_HOST_KERNEL=torch keeps torch's path."""
    if os.environ.get("MOE_HOST_KERNEL", "").strip().lower() == "torch":
        return None, "torch (MOE_HOST_KERNEL=torch)"
    return build_host_kernel()


def host_path(dtype: torch.dtype) -> str:
    """What host_expert_forward runs for experts of this dtype at N <= HOST_KERNEL_MAX_ROWS."""
    if dtype != torch.bfloat16:
        return f"torch ({str(dtype).removeprefix('torch.')} experts)"
    kernel, how = host_kernel()
    if kernel is None:
        return f"torch ({how})"
    return f"{how}, {torch.get_num_threads()} thread(s), N <= {HOST_KERNEL_MAX_ROWS}; torch above"


def _kernel_applies(x_ND: torch.Tensor, dtype: torch.dtype, w13_DF2: torch.Tensor, w2_FD: torch.Tensor) -> bool:
    """bf16 inference (the kernel has no backward) at a decode batch, with the kernel built."""
    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, w13_DF2, w2_FD))
    return (dtype == torch.bfloat16 and 1 <= x_ND.shape[0] <= HOST_KERNEL_MAX_ROWS and not grads
            and w13_DF2.dtype == torch.bfloat16 and w2_FD.dtype == torch.bfloat16
            and w13_DF2.device.type == "cpu" and w2_FD.device.type == "cpu" and host_kernel()[0] is not None)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="moe-host")
        return _pool


def _bf16_rows(x_ND: torch.Tensor) -> torch.Tensor:
    """x as contiguous bf16 rows of even length (a zero column appended when D is odd): the kernel
    reads activations two at a time."""
    n, d = x_ND.shape
    if d % 2 == 0:
        return x_ND.to(torch.bfloat16).contiguous()
    out = torch.zeros(n, d + 1, dtype=torch.bfloat16)
    out[:, :d] = x_ND
    return out


def host_matmul(x_ND: torch.Tensor, w_DO: torch.Tensor, *, threads: int | None = None,
                kernel: HostKernel | None = None) -> torch.Tensor:
    """fp32 x_ND @ w_DO for bf16 w_DO [D, O] (row-major, on the host) through the C kernel: bf16
    products exact, fp32 sums. x is rounded to bf16 (it is bf16 already on the bf16 path). The
    columns are split between `threads` (default torch.get_num_threads()) workers. `kernel`: another
    build (tests); default host_kernel()."""
    kernel = kernel or host_kernel()[0]
    if kernel is None:
        raise RuntimeError(f"the host kernel is not available: {host_kernel()[1]}")
    N, D = x_ND.shape
    if w_DO.dtype != torch.bfloat16 or w_DO.dim() != 2 or w_DO.shape[0] != D or w_DO.device.type != "cpu" \
            or x_ND.device.type != "cpu":
        raise ValueError(f"host_matmul needs host x [N, D] and a bf16 host weight [D, O]; got x "
                         f"{tuple(x_ND.shape)} on {x_ND.device} and w {tuple(w_DO.shape)} {w_DO.dtype} "
                         f"on {w_DO.device}")
    w = w_DO.contiguous()
    O = w.shape[1]
    xb = _bf16_rows(x_ND)
    y = torch.empty(N, O, dtype=torch.float32)
    if N == 0 or O == 0:
        return y.zero_()
    call = kernel.lib.moe_host_matmul_bf16
    args = (w.data_ptr(), xb.data_ptr(), xb.shape[1], y.data_ptr(), N, D, O)
    t = max(1, min(threads or torch.get_num_threads(), O // 64))
    if t == 1:
        call(*args, 0, O)
    else:  # ctypes drops the GIL for the call: the parts run in parallel, each on its own columns
        cuts = [min(O, (O * i // t) // 32 * 32) for i in range(t)] + [O]
        for f in [_threads().submit(call, *args, a, b) for a, b in zip(cuts, cuts[1:]) if a < b]:
            f.result()
    return y


def kernel_expert_forward(x_ND: torch.Tensor, w13_DF2: torch.Tensor, w2_FD: torch.Tensor,
                          *, threads: int | None = None, kernel: HostKernel | None = None) -> torch.Tensor:
    """One bf16 SwiGLU expert on host cores through the C kernel: h = x W13 (fp32), a = silu(gate) * up
    (fp32, rounded to bf16 once), y = a W2; returns bf16 [N, D]."""
    F = w2_FD.shape[0]
    h = host_matmul(x_ND, w13_DF2, threads=threads, kernel=kernel)
    a = tnf.silu(h[:, :F]).mul_(h[:, F:])
    return host_matmul(a, w2_FD, threads=threads, kernel=kernel).to(torch.bfloat16)


__all__ = ["Calibration", "CostModel", "calibrate", "expert_forward", "host_expert_forward", "interpolate",
           "DECISIONS", "HOST_KERNEL_MAX_ROWS", "HostKernel", "build_c_library", "build_host_kernel", "host_kernel", "host_path",
           "host_matmul", "kernel_expert_forward"]
