"""Triton kernels against their plain-PyTorch references: forward and every gradient.

Legend: T tokens, N routed rows, D model dim, F expert hidden dim, E experts, K top-k.

Without CUDA the kernels run in the Triton interpreter on tiny shapes (under a minute or two on 2 cores);
with CUDA the same tests run compiled on the GPU, plus the `gpu` tier (larger shapes, CUDA graphs):
    TRITON_INTERPRET=1 python -m pytest tests/test_kernels_triton.py -q
    python -m pytest tests/test_kernels_triton.py -q            # on a CUDA machine: both tiers
Every output buffer the kernels allocate is filled with NaN first, so a row or tile that a kernel
forgets to write fails the comparison.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # triton.jit reads TRITON_INTERPRET when a kernel is *defined*, i.e. when kernels.grouped_gemm is first
    # imported, so it must be set before that import (an earlier `import triton` or `import torch` is harmless)
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton", reason="Triton is not installed (pip install 'moe-runtime[triton]'); "
                                     "the reference kernels are used and tested without it")

from moe_runtime import kernels  # noqa: E402
from moe_runtime.kernels import _common, grouped_gemm as gg, permutation as perm  # noqa: E402
from moe_runtime.kernels.reference import (grouped_matmul_reference, grouped_mlp_reference, per_token_moe_reference,  # noqa: E402
                               permute_reference, unpermute_reference)

INTERPRETED = gg.INTERPRETED
# kernels imported earlier in this process without the interpreter cannot run on the CPU here;
# then test_file_in_fresh_process runs this file again in a process of its own
STALE = not CUDA and not INTERPRETED
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
ROOT = Path(__file__).resolve().parents[1]

# max |error| allowed, relative to the scale of the expected tensor (max(1, max |expected|));
# bf16 and fp16 outputs carry rounded intermediates (h, a, dH) exactly as the reference's do
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, *, exact: bool = False,
                 dtype: torch.dtype | None = None) -> None:
    """Kernel result vs float64 reference, with the tolerance of the dtype the computation ran in
    (`dtype`, default actual's; an fp32 weight gradient of a bf16 MoE is a bf16 computation), or bit-exact."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.double() - expected.double().to(actual.device)).abs()
    nonfinite = int((~torch.isfinite(actual)).sum())
    max_err = err.max().item() if err.numel() else 0.0
    mean_err = err.mean().item() if err.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    allowed = 0.0 if exact else TOLERANCE[dtype or actual.dtype] * scale
    assert nonfinite == 0 and max_err <= allowed, (
        f"{what} ({actual.dtype}): max abs error {max_err:.3g}, mean {mean_err:.3g}, allowed {allowed:.3g}; "
        f"{nonfinite} non-finite elements (NaN = never written)")


def _poisoned_output(shape, like, dtype=None):
    return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


@pytest.fixture(autouse=True)
def kernel_env(request, monkeypatch):
    if STALE and request.node.originalname != "test_file_in_fresh_process":
        pytest.skip("moe_runtime.kernels.grouped_gemm was imported without TRITON_INTERPRET=1 before this module; "
                    "test_file_in_fresh_process runs these tests in a new process")
    monkeypatch.setattr(_common, "empty_output", _poisoned_output)
    kernels.set_backend(None)
    tf32 = torch.backends.cuda.matmul.allow_tf32  # a cuBLAS switch object; monkeypatch cannot restore it
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.skipif(not STALE, reason="the kernels already run through the interpreter in this process")
def test_file_in_fresh_process():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]


# ---------------------------------------------------------------- inputs

def _random_counts(E: int, N: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.bincount(torch.randint(0, E, (N,), generator=g), minlength=E).tolist()


def _leaves(*tensors: torch.Tensor, dtype: torch.dtype, device: str = DEVICE) -> list[torch.Tensor]:
    return [t.to(device, dtype).requires_grad_() for t in tensors]


def _mlp_inputs(counts: list[int], D: int, F: int, dtype: torch.dtype, seed: int = 0,
                counts_dtype: torch.dtype = torch.int64, device: str = DEVICE):
    g = torch.Generator().manual_seed(seed)
    N, E = sum(counts), len(counts)
    x = torch.randn(N, D, generator=g)
    w13 = torch.randn(E, D, 2 * F, generator=g) / D ** 0.5
    w2 = torch.randn(E, F, D, generator=g) / F ** 0.5
    dy = torch.randn(N, D, generator=g).to(device, dtype)
    return (*_leaves(x, w13, w2, dtype=dtype, device=device),
            torch.tensor(counts, dtype=counts_dtype, device=device), dy)


def _reference_grads(fn, inputs: list[torch.Tensor], args: tuple, dy: torch.Tensor):
    """fn on float64 CPU copies of `inputs` (+ non-differentiable CPU args), and the gradients for dy."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in inputs]
    out = fn(*leaves, *args)
    return out, torch.autograd.grad(out, leaves, dy.cpu().double())


def _check_against(name: str, out, grads, ref_out, ref_grads, grad_names: list[str]) -> None:
    assert_close(out, ref_out, f"{name} forward")
    for g, rg, gname in zip(grads, ref_grads, grad_names):
        assert_close(g, rg, f"{name} d{gname}", dtype=out.dtype)


# ---------------------------------------------------------------- grouped MLP and grouped GEMM

MLP_CASES = {  # counts per expert, D, F (D, F deliberately not multiples of the 16/32 tiles)
    "uneven_with_empty_experts": ([5, 0, 12, 1, 0, 9, 3, 2], 24, 40),
    "all_rows_on_one_expert": ([0, 0, 0, 0, 0, 29, 0, 0], 24, 40),
    "one_expert": ([37], 24, 40),
    "e64_few_rows": (_random_counts(64, 20, seed=1), 16, 24),
    "e128_few_rows": (_random_counts(128, 24, seed=2), 16, 16),
    "no_rows": ([0, 0, 0], 16, 24),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(MLP_CASES))
def test_grouped_mlp_matches_reference(case, dtype):
    counts, D, F = MLP_CASES[case]
    x, w13, w2, counts_E, dy = _mlp_inputs(counts, D, F, dtype, counts_dtype=torch.int32 if "e128" in case else torch.int64)
    y = gg.grouped_mlp_triton(x, w13, w2, counts_E)
    grads = torch.autograd.grad(y, (x, w13, w2), dy)
    ref_y, ref_grads = _reference_grads(grouped_mlp_reference, [x, w13, w2], (counts_E.cpu(),), dy)
    _check_against("grouped_mlp", y, grads, ref_y, ref_grads, ["x", "w13", "w2"])


def test_grouped_mlp_fp16():
    x, w13, w2, counts_E, dy = _mlp_inputs([7, 0, 19, 4], 24, 40, torch.float16, seed=3)
    y = gg.grouped_mlp_triton(x, w13, w2, counts_E)
    grads = torch.autograd.grad(y, (x, w13, w2), dy)
    ref_y, ref_grads = _reference_grads(grouped_mlp_reference, [x, w13, w2], (counts_E.cpu(),), dy)
    _check_against("grouped_mlp", y, grads, ref_y, ref_grads, ["x", "w13", "w2"])


def test_grouped_mlp_without_grad_is_bit_identical():
    """The inference path (h not stored) computes the same bits as the training path."""
    x, w13, w2, counts_E, _ = _mlp_inputs([6, 0, 11, 3], 24, 40, torch.bfloat16, seed=4)
    with torch.no_grad():
        y_inference = gg.grouped_mlp_triton(x, w13, w2, counts_E)
    y_training = gg.grouped_mlp_triton(x, w13, w2, counts_E)
    assert y_training.requires_grad and not y_inference.requires_grad
    assert torch.equal(y_inference, y_training.detach())


def test_grouped_mlp_frozen_weights_gives_only_dx():
    x, w13, w2, counts_E, dy = _mlp_inputs([9, 2, 0, 14], 24, 40, torch.float32, seed=5)
    w13.requires_grad_(False)
    w2.requires_grad_(False)
    (dx,) = torch.autograd.grad(gg.grouped_mlp_triton(x, w13, w2, counts_E), (x,), dy)
    frozen = [w.detach().cpu().double() for w in (w13, w2)]
    _, (ref_dx,) = _reference_grads(lambda x_: grouped_mlp_reference(x_, *frozen, counts_E.cpu()), [x], (), dy)
    assert_close(dx, ref_dx, "grouped_mlp dx with frozen weights")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_gemm_matches_reference(dtype):
    counts = [3, 0, 17, 1, 0, 9]
    g = torch.Generator().manual_seed(6)
    x, w = _leaves(torch.randn(30, 24, generator=g), torch.randn(6, 24, 40, generator=g) / 5, dtype=dtype)
    counts_E = torch.tensor(counts, device=DEVICE)
    dy = torch.randn(30, 40, generator=g).to(DEVICE, dtype)
    y = gg.grouped_gemm_triton(x, w, counts_E)
    grads = torch.autograd.grad(y, (x, w), dy)
    ref_y, ref_grads = _reference_grads(grouped_matmul_reference, [x, w], (counts_E.cpu(),), dy)
    _check_against("grouped_gemm", y, grads, ref_y, ref_grads, ["x", "w"])


def test_poisoned_outputs_catch_unwritten_tiles(monkeypatch):
    """The NaN poison is what would expose a schedule that skips tiles: shrink the grid and see it."""
    x, w13, w2, counts_E, _ = _mlp_inputs([5, 0, 12, 1], 24, 40, torch.float32, seed=7)
    monkeypatch.setattr(gg, "row_tile_bound", lambda N, E, block_m: 1)
    with torch.no_grad():
        y = gg.grouped_mlp_triton(x, w13, w2, counts_E)
    assert torch.isnan(y).any(), "a grid of one row tile cannot have written all 18 rows"
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(y, grouped_mlp_reference(x.double(), w13.double(), w2.double(), counts_E), "y")


# ---------------------------------------------------------------- permute / unpermute

def _token_idx(T: int, N: int, seed: int, dtype=torch.int64) -> torch.Tensor:
    """N rows pointing at tokens 0..T-3 (repeats included); the last two tokens get no rows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, T - 2, (N,), generator=g).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32], ids=["i64", "i32"])
def test_permute_matches_reference(dtype, idx_dtype):
    T, D, N = 13, 40, 30
    token_idx = _token_idx(T, N, seed=8, dtype=idx_dtype)
    g = torch.Generator().manual_seed(9)
    (x,) = _leaves(torch.randn(T, D, generator=g), dtype=dtype)
    dy = torch.randn(N, D, generator=g).to(DEVICE, dtype)
    out = perm.permute_triton(x, token_idx)
    (dx,) = torch.autograd.grad(out, (x,), dy)
    assert_close(out, permute_reference(x.detach(), token_idx), "permute forward", exact=True)
    _, (ref_dx,) = _reference_grads(permute_reference, [x], (token_idx.cpu().long(),), dy)
    assert_close(dx, ref_dx, "permute dx")
    assert (dx[T - 2:] == 0).all(), "tokens without rows must get zero gradient"


@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.bfloat16, torch.bfloat16)], ids=["fp32", "bf16-w32", "bf16"])
def test_unpermute_matches_reference(dtype, w_dtype):
    T, D, N = 13, 40, 30
    token_idx = _token_idx(T, N, seed=10)
    g = torch.Generator().manual_seed(11)
    (y,) = _leaves(torch.randn(N, D, generator=g), dtype=dtype)
    (w,) = _leaves(torch.rand(N, generator=g), dtype=w_dtype)
    dout = torch.randn(T, D, generator=g).to(DEVICE, dtype)
    out = perm.unpermute_triton(y, token_idx, w, T)
    dy, dw = torch.autograd.grad(out, (y, w), dout)
    # the reference rounds the weights to y's dtype before multiplying; so does the kernel
    ref_fn = lambda y_, w_: unpermute_reference(y_, token_idx.cpu(), w_.to(dtype).double(), T)  # noqa: E731
    ref_out, (ref_dy, ref_dw) = _reference_grads(ref_fn, [y, w], (), dout)
    _check_against("unpermute", out, (dy, dw), ref_out, (ref_dy, ref_dw), ["y", "weight"])
    assert (out[T - 2:] == 0).all(), "tokens without rows must come out as zeros"


def test_permute_and_unpermute_with_no_rows():
    x = torch.randn(5, 24, device=DEVICE)
    idx = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert perm.permute_triton(x, idx).shape == (0, 24)
    out = perm.unpermute_triton(x[:0], idx, torch.zeros(0, device=DEVICE), 5)
    assert_close(out, torch.zeros(5, 24, dtype=torch.float64), "unpermute of zero rows", exact=True)


# ---------------------------------------------------------------- the MoE composition

def _moe_triton(x_TD, topk_idx_TK, topk_w_TK, w13, w2):
    """Router output -> permute -> grouped MLP -> weighted unpermute, all on the Triton kernels."""
    T, K = topk_idx_TK.shape
    order_N, counts_E = kernels.sort_by_expert(topk_idx_TK, w13.shape[0])
    token_idx_N = order_N // K
    weight_N = topk_w_TK.reshape(-1).index_select(0, order_N)
    x_sorted_ND = perm.permute_triton(x_TD, token_idx_N)
    y_sorted_ND = gg.grouped_mlp_triton(x_sorted_ND, w13, w2, counts_E)
    return perm.unpermute_triton(y_sorted_ND, token_idx_N, weight_N, T)


@pytest.mark.parametrize("dtype,top_k", [(torch.float32, k) for k in range(1, 9)]
                         + [(torch.bfloat16, 2), (torch.bfloat16, 8)],
                         ids=[f"fp32-k{k}" for k in range(1, 9)] + ["bf16-k2", "bf16-k8"])
def test_moe_composition_matches_per_token_loop(dtype, top_k):
    """top_k = 1..8 over E = 8 experts (top_k = E included) against the per-token Python loop."""
    T, D, F, E = 6, 16, 24, 8
    g = torch.Generator().manual_seed(100 + top_k)
    topk_w, topk_idx = torch.randn(T, E, generator=g).softmax(-1).topk(top_k, dim=-1)
    x, w13, w2 = _leaves(torch.randn(T, D, generator=g), torch.randn(E, D, 2 * F, generator=g) / D ** 0.5,
                         torch.randn(E, F, D, generator=g) / F ** 0.5, dtype=dtype)
    (topk_w,) = _leaves(topk_w, dtype=torch.float32)
    topk_idx = topk_idx.to(DEVICE)
    dout = torch.randn(T, D, generator=g).to(DEVICE, dtype)
    out = _moe_triton(x, topk_idx, topk_w, w13, w2)
    grads = torch.autograd.grad(out, (x, w13, w2, topk_w), dout)
    ref_fn = lambda x_, w13_, w2_, tw_: per_token_moe_reference(x_, topk_idx.cpu(), tw_, w13_, w2_)  # noqa: E731
    ref_out, ref_grads = _reference_grads(ref_fn, [x, w13, w2, topk_w], (), dout)
    _check_against(f"moe top_k={top_k}", out, grads, ref_out, ref_grads, ["x", "w13", "w2", "topk_w"])


# ---------------------------------------------------------------- torch.library registrations

def _opcheck_args(name: str):
    x, w13, w2, counts_E, dy = _mlp_inputs([3, 0, 5], 16, 16, torch.float32, seed=17)
    h = torch.randn(8, 32, device=DEVICE)
    idx = torch.tensor([1, 0, 4, 4, 0, 1, 1, 3], device=DEVICE)
    w = torch.rand(8, device=DEVICE, requires_grad=True)
    return {
        "grouped_gemm": (x, w13, counts_E),
        "grouped_gemm_bwd": (torch.randn(8, 32, device=DEVICE), x.detach(), w13.detach(), counts_E, True, True),
        "grouped_mlp_fwd": (x, w13, w2, counts_E, True),
        "grouped_mlp_bwd": (dy, x.detach(), h, w13.detach(), w2.detach(), counts_E, True, True),
        "permute": (x, idx),
        "unpermute": (x, idx, w, 5),
        "unpermute_unweighted": (x, idx, None, 5),
        "unpermute_bwd": (torch.randn(5, 16, device=DEVICE), x.detach(), idx, w.detach()),
    }[name]


@pytest.mark.parametrize("name", ["grouped_gemm", "grouped_gemm_bwd", "grouped_mlp_fwd", "grouped_mlp_bwd",
                                  "permute", "unpermute", "unpermute_unweighted", "unpermute_bwd"])
def test_custom_op_registrations(name):
    """Schema, fake kernel and autograd registration agree with the real op (what torch.compile relies on)."""
    op = getattr(torch.ops.moe_kernels, name.replace("_unweighted", ""))
    result = torch.library.opcheck(op, _opcheck_args(name))
    assert set(result.values()) == {"SUCCESS"}, result


# ---------------------------------------------------------------- backend routing

def test_backend_routes_to_triton(monkeypatch):
    monkeypatch.setenv("MOE_KERNELS", "triton")
    calls = []
    for module, name in [(gg, "grouped_mlp_triton"), (perm, "permute_triton"), (perm, "unpermute_triton")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    x, w13, w2, counts_E, _ = _mlp_inputs([4, 0, 3], 16, 24, torch.float32, seed=12)
    idx = torch.arange(7, device=DEVICE)
    with torch.no_grad():
        y = kernels.grouped_mlp(x, w13, w2, counts_E)
        kernels.unpermute(kernels.permute(y, idx), idx, torch.ones(7, device=DEVICE), 7)
        kernels.permute(y, idx)  # the package's `permute` is still the function after its kernels loaded
    assert calls == ["grouped_mlp_triton", "permute_triton", "unpermute_triton", "permute_triton"]
    assert kernels.backend_for(x.device) == "triton"
    monkeypatch.setenv("MOE_KERNELS", "reference")
    assert kernels.backend_for(x.device) == "reference"


# ---------------------------------------------------------------- input validation (messages are API)

def _valid_mlp_args():
    x, w13, w2, counts_E, _ = _mlp_inputs([2, 3, 1], 16, 24, torch.float32)
    return [t.detach() for t in (x, w13, w2)] + [counts_E]


# value checks (counts, index ranges) are asynchronous device asserts on CUDA, to avoid a host sync;
# a failing one would poison the CUDA context, so those cases run on the CPU only
value_check = pytest.mark.skipif(DEVICE == "cuda", reason="on CUDA a value check is an async device assert")


@pytest.mark.parametrize("mutate,message", [
    pytest.param(lambda a: a.__setitem__(3, a[3] + 1),
                 r"counts_E must be non-negative and sum to the number of rows N=6", marks=value_check, id="sum"),
    pytest.param(lambda a: a.__setitem__(3, torch.tensor([7, -2, 1], device=DEVICE)),
                 r"counts_E must be non-negative", marks=value_check, id="negative"),
    pytest.param(lambda a: a.__setitem__(3, a[3].float()),
                 r"counts_E must be a 1-D tensor of torch.int32 or torch.int64", id="float-counts"),
    pytest.param(lambda a: a.__setitem__(3, a[3][:2]),
                 r"w13_EDF2 holds 3 experts but counts_E has 2 entries", id="num-experts"),
    pytest.param(lambda a: a.__setitem__(0, a[0][None]),
                 r"x_sorted_ND must have 2 dims, got shape \(1, 6, 16\)", id="rank"),
    pytest.param(lambda a: a.__setitem__(0, a[0].double()),
                 r"x_sorted_ND has dtype torch.float64; supported", id="float64"),
    pytest.param(lambda a: a.__setitem__(1, a[1].half()),
                 r"w13_EDF2 has dtype torch.float16 but the rows have torch.float32", id="mixed-dtypes"),
    pytest.param(lambda a: a.__setitem__(1, a[1][..., :47].contiguous()),
                 r"w13_EDF2 has last dim 47; it must be 2F", id="odd-2F"),
    pytest.param(lambda a: a.__setitem__(2, a[2][:, :20].contiguous()),
                 r"w2_EFD has shape \(3, 20, 16\), expected \[E, 24", id="w2-shape"),
    pytest.param(lambda a: a.__setitem__(0, a[0].t().contiguous().t()),
                 r"x_sorted_ND .* is not contiguous", id="non-contiguous"),
])
def test_grouped_mlp_rejects_bad_inputs(mutate, message):
    args = _valid_mlp_args()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        gg.grouped_mlp_triton(*args)


def test_grouped_gemm_rejects_mismatched_weight():
    x, w, counts = torch.randn(6, 16, device=DEVICE), torch.randn(3, 12, 8, device=DEVICE), torch.tensor([2, 3, 1])
    with pytest.raises(ValueError, match=r"w_EKO has shape \(3, 12, 8\), expected \[E, 16, ...\]"):
        gg.grouped_gemm_triton(x, w, counts.to(DEVICE))


@pytest.mark.parametrize("call,message", [
    pytest.param(lambda x, y, i, w: perm.permute_triton(x, i + 3),
                 r"token_idx_N has entries outside \[0, 5\)", marks=value_check, id="permute-range"),
    pytest.param(lambda x, y, i, w: perm.permute_triton(x, i.float()),
                 r"token_idx_N must be a 1-D tensor of torch.int32", id="permute-dtype"),
    pytest.param(lambda x, y, i, w: perm.unpermute_triton(y, i, w[:3], 5),
                 r"weight_N has 3 entries but 4 are needed", id="weight-length"),
    pytest.param(lambda x, y, i, w: perm.unpermute_triton(y, i, w, -1),
                 r"num_tokens=-1 must be a non-negative int", id="num-tokens"),
    pytest.param(lambda x, y, i, w: perm.unpermute_triton(y, i, w, 2),
                 r"token_idx_N has entries outside \[0, 2\)", marks=value_check, id="unpermute-range"),
    pytest.param(lambda x, y, i, w: perm.unpermute_triton(y, i, None, 5), r"weight_N is required", id="no-weight"),
    pytest.param(lambda x, y, i, w: perm.unpermute_triton(y[:, ::2], i, w, 5),
                 r"y_ND .* is not contiguous", id="non-contiguous"),
])
def test_permutation_rejects_bad_inputs(call, message):
    x, y = torch.randn(5, 16, device=DEVICE), torch.randn(4, 16, device=DEVICE)
    idx, w = torch.tensor([0, 4, 2, 2], device=DEVICE), torch.ones(4, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        call(x, y, idx, w)


# ---------------------------------------------------------------- GPU tier

gpu = pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs a CUDA device and compiled (not interpreted) kernels")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("E,N,D,F", [(8, 4096, 512, 1408), (64, 8192, 256, 96), (128, 3000, 384, 200)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_gpu_grouped_mlp_large(E, N, D, F, dtype):
    counts = _random_counts(E, N, seed=E)
    counts[1] = 0  # one empty expert, and one that takes its rows
    counts[0] = N - sum(counts[1:])
    x, w13, w2, counts_E, dy = _mlp_inputs(counts, D, F, dtype, seed=13, device="cuda")
    y = gg.grouped_mlp_triton(x, w13, w2, counts_E)
    grads = torch.autograd.grad(y, (x, w13, w2), dy)
    leaves = [t.detach().double().requires_grad_() for t in (x, w13, w2)]
    ref_y = grouped_mlp_reference(*leaves, counts_E)
    ref_grads = torch.autograd.grad(ref_y, leaves, dy.double())
    _check_against("grouped_mlp (gpu)", y, grads, ref_y, ref_grads, ["x", "w13", "w2"])


@pytest.mark.gpu
@gpu
def test_gpu_cuda_graph_replays_new_counts():
    """No host sync on the counts: a captured forward replays correctly after counts change in place."""
    E, N, D, F = 16, 1024, 256, 128
    x, w13, w2, counts_E, _ = _mlp_inputs(_random_counts(E, N, seed=14), D, F, torch.bfloat16, device="cuda")
    x, w13, w2 = (t.detach() for t in (x, w13, w2))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gg.grouped_mlp_triton(x, w13, w2, counts_E)  # autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gg.grouped_mlp_triton(x, w13, w2, counts_E)
    for seed in (15, 16):
        counts_E.copy_(torch.tensor(_random_counts(E, N, seed=seed)))
        graph.replay()
        expected = grouped_mlp_reference(x.double(), w13.double(), w2.double(), counts_E)
        assert_close(y, expected, f"graph replay with counts seed {seed}")


@pytest.mark.gpu
@gpu
def test_gpu_rejects_inputs_on_two_devices():
    x, w13, w2, counts_E, _ = _mlp_inputs([3, 4], 32, 32, torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="all inputs must be on one device"):
        gg.grouped_mlp_triton(x, w13, w2, counts_E.cpu())
