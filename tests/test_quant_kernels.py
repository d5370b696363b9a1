"""Quantised expert MLP: the fused-dequantisation Triton kernel (interpreter on CPU, tiny shapes)
and the host path (offload/quant_host.py) against dequantise-then-reference, odd shapes included.

Legend: N routed rows, D model dim, F expert hidden dim, E experts.
    TRITON_INTERPRET=1 python -m pytest tests/test_quant_kernels.py -q
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import single_thread  # noqa: F401  (autouse: one torch thread)

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported (see test_kernels_triton.py)

from moe_runtime.kernels import _common, quant as Q  # noqa: E402
from moe_runtime.kernels.reference import grouped_mlp_reference  # noqa: E402
from moe_runtime.offload import quant_host  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# fp32 rounding: sums of up to ~64 products in a different order
FP32_TOL = 2e-5


def _triton_ready() -> bool:
    try:
        from moe_runtime.kernels import quant_gemm
    except ImportError:
        return False
    return CUDA or quant_gemm.INTERPRETED


def _case(fmt: str, counts: list[int], D: int, F: int, seed: int = 0, group: int | None = None):
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    qe = Q.quantize_experts(torch.randn(E, D, 2 * F, generator=g) / D ** 0.5,
                            torch.randn(E, F, D, generator=g) / F ** 0.5, fmt, group)
    x = torch.randn(sum(counts), D, generator=g)
    return x, qe, torch.tensor(counts)


def _assert_close(actual, expected, what, tol=FP32_TOL):
    err = (actual.double() - expected.double()).abs()
    scale = max(1.0, expected.abs().max().item())
    assert torch.isfinite(actual).all(), f"{what}: non-finite elements (NaN = never written)"
    assert err.max().item() <= tol * scale, f"{what}: max abs error {err.max():.3g}, mean {err.mean():.3g}"


def _poisoned(shape, like, dtype=None):
    return torch.full(shape, float("nan"), dtype=dtype or like.dtype, device=like.device)


@pytest.mark.skipif(not _triton_ready(), reason="kernels were imported without TRITON_INTERPRET=1; "
                    "test_triton_in_fresh_process runs these in a process of their own")
@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32), ("mxfp4", None)])
@pytest.mark.parametrize("counts,D,F", [([3, 0, 17], 40, 24), ([1], 70, 33), ([0, 5], 33, 9)])
def test_triton_equals_dequantised_reference(monkeypatch, fmt, group, counts, D, F):
    """Fused decode == dequantise-then-grouped_mlp_reference within fp32 rounding (TF32 off);
    D, F not multiples of the tile, the int4 group or the MX block; an expert with no rows."""
    from moe_runtime.kernels.quant_gemm import grouped_mlp_quant_triton
    monkeypatch.setattr(_common, "empty_output", _poisoned)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x, qe, c = _case(fmt, counts, D, F, group=group)
        w13, w2 = qe.dequantize(torch.float32)
        expected = grouped_mlp_reference(x, w13, w2, c)
        dev = "cuda" if CUDA else "cpu"
        y = grouped_mlp_quant_triton(x.to(dev), qe.to(dev), c.to(dev)).cpu()
        _assert_close(y, expected, f"triton {fmt} counts={counts} D={D} F={F}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_triton_in_fresh_process():
    """Runs this file again with the interpreter on when kernels were imported without it here."""
    if _triton_ready():
        pytest.skip("the Triton tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-k", "triton"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("N,D,F", [(1, 64, 48), (5, 37, 29), (3, 130, 70)])
def test_host_path_equals_dequantised_reference(fmt, N, D, F):
    """The host expert path on quantised store bytes == dequantise-then-reference in fp32."""
    x, qe, c = _case(fmt, [N], D, F, seed=N + D)
    w13, w2 = qe.dequantize(torch.float32)
    expected = grouped_mlp_reference(x, w13, w2, c)
    y = quant_host.host_quant_expert_forward(x, qe[0])
    _assert_close(y, expected, f"host {fmt} N={N} D={D} F={F}")


def test_host_path_chunks_output_channels():
    """The host path decodes a few output channels at a time; a chunk smaller than F gives the same."""
    x, qe, c = _case("int4", [4], 64, 40, group=32)
    full = quant_host.host_quant_expert_forward(x, qe[0], impl="torch")
    small = quant_host.host_quant_expert_forward(x, qe[0], chunk_channels=7, impl="torch")
    _assert_close(small, full, "host int4 with 7-channel chunks")


def test_host_path_bf16_int8_uses_torch_op():
    """bf16 rows on an int8 expert go through torch._weight_int8pack_mm (when torch has it) and agree with
    dequantise-then-matmul in bf16 within bf16 rounding."""
    x, qe, c = _case("int8", [3], 64, 32)
    w13, w2 = qe.dequantize(torch.float32)
    expected = grouped_mlp_reference(x, w13, w2, c)
    y = quant_host.host_quant_expert_forward(x.bfloat16(), qe[0], impl="torch")
    assert y.dtype == torch.bfloat16
    _assert_close(y.float(), expected, "host int8 bf16", tol=3e-2)
