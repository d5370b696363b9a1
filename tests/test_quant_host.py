"""The quantised host expert path (offload/quant_host.py, offload/quant_kernel.py): the C kernel (AVX-512
where built), its portable C loop and the torch path against dequantise-then-reference.

Legend: N token rows, D model dim, F expert hidden dim, K / O a weight's reduction / output dim.
    python -m pytest tests/test_quant_host.py -q
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import single_thread  # noqa: F401  (autouse: one torch thread)
from moe_runtime.kernels import quant as Q
from moe_runtime.kernels.reference import grouped_mlp_reference
from moe_runtime.offload import quant_host, quant_kernel as qk

KERNEL, HOW = qk.quant_kernel()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason=f"no quantised host kernel here: {HOW}")
needs_avx512 = pytest.mark.skipif(KERNEL is None or KERNEL.isa != "avx512", reason=f"no AVX-512 kernel here: {HOW}")
FP32_TOL = 2e-5  # fp32 sums of the same products in another order
CASES = [("int4", 32), ("int4", 64), ("int4", 128), ("int4", 48), ("mxfp4", None), ("int8", None)]
SHAPES = [(64, 48), (37, 29), (130, 70), (200, 33)]  # D, F: odd, and not multiples of 16 / 32 / the group


def _expert(fmt, group, D, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Q.quantize_experts(torch.randn(1, D, 2 * F, generator=g) / D ** 0.5,
                              torch.randn(1, F, D, generator=g) / F ** 0.5, fmt, group)


def _assert_close(actual, expected, what, tol=FP32_TOL):
    err = (actual.double() - expected.double()).abs()
    assert torch.isfinite(actual).all(), f"{what}: non-finite elements"
    assert err.max().item() <= tol * max(1.0, expected.abs().max().item()), \
        f"{what}: max abs error {err.max():.3g}, mean {err.mean():.3g}"


@pytest.mark.parametrize("impl", quant_host.IMPLS)
@pytest.mark.parametrize("fmt,group", CASES)
@pytest.mark.parametrize("D,F", SHAPES)
def test_expert_equals_dequantised_reference(impl, fmt, group, D, F):
    """Each path's expert (W13 GEMV, SwiGLU, W2 GEMV) == dequantise-then-reference in fp32, N = 1..16."""
    if impl != "torch" and KERNEL is None:
        pytest.skip(f"no quantised host kernel here: {HOW}")
    qe = _expert(fmt, group, D, F, seed=D + F)
    w13, w2 = qe.dequantize(torch.float32)
    for N in (1, 3, 8, 16):
        x = torch.randn(N, D, generator=torch.Generator().manual_seed(N))
        expected = grouped_mlp_reference(x, w13, w2, torch.tensor([N]))
        y = quant_host.host_quant_expert_forward(x, qe[0], impl=impl)
        _assert_close(y, expected, f"{impl} {fmt}/{group} N={N} D={D} F={F}")


@needs_kernel
@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("fmt,group", CASES)
def test_kernel_decodes_exactly(fmt, group, portable):
    """One-hot rows pick single weights: the kernel's W equals kernels/quant.py's decode bit for bit
    (int8: q * scale in fp32, the same product), every nibble, group, table entry and padded tail."""
    K, O = 75, 37
    g = torch.Generator().manual_seed(3)
    w = Q.quantize(torch.randn(1, K, O, generator=g) * torch.logspace(-3, 1, K)[None, :, None], fmt, group)
    want = w.dequantize(torch.float32)[0]
    for k0 in range(0, K, 16):
        eye = torch.eye(K)[k0:k0 + 16]
        got = qk.kernel_quant_linear(eye, w, portable=portable)
        assert torch.equal(got, want[k0:k0 + 16]), f"{fmt}/{group} rows {k0}..: max diff " \
            f"{(got - want[k0:k0 + 16]).abs().max():.3g}"


@needs_kernel
@pytest.mark.parametrize("fmt,group", CASES)
def test_long_rows(fmt, group):
    """K long enough for the int4 scales / zeros to be converted 16 groups at a time (plus a tail of
    groups) and for many 16-byte chunks per group row; prefetches run past the last row."""
    K, O = 1030, 21
    w = Q.quantize(torch.randn(1, K, O) / K ** 0.5, fmt, group)
    x = torch.randn(3, K)
    want = x.double() @ w.dequantize(torch.float64)[0]
    for portable in (False, True):
        _assert_close(qk.kernel_quant_linear(x, w, portable=portable), want, f"{fmt}/{group} K={K}")


@needs_kernel
def test_mxfp4_table_is_the_formats_decode():
    """The kernel's [256, 16] MXFP4 table is exactly e2m1 * 2^(e - 127) as kernels/quant.py decodes it."""
    codes = torch.arange(16, dtype=torch.uint8)
    packed = (codes[0::2] | (codes[1::2] << 4))[None, None].expand(1, 256, 8).contiguous()
    fields = {"q": packed[:, :, :8].repeat(1, 1, 2), "scale": torch.arange(256, dtype=torch.uint8)[None, :, None]}
    w = Q.QWeight("mxfp4", 32, 32, 256, fields)
    want = w.decode_rows(slice(0, 256))[0, :, :16]
    assert torch.equal(qk._mxfp4_table()[:255], want[:255])  # e = 255 is NaN (0 * 2^128)


@needs_kernel
@pytest.mark.parametrize("fmt,group", [("int4", 64), ("mxfp4", None), ("int8", None)])
def test_threads_split_columns_bit_for_bit(fmt, group):
    """Columns split between workers give the same bits as one worker (each column is one worker's)."""
    w = Q.quantize(torch.randn(1, 96, 300), fmt, group)
    x = torch.randn(5, 96)
    assert torch.equal(qk.kernel_quant_linear(x, w, threads=3), qk.kernel_quant_linear(x, w, threads=1))


@needs_kernel
def test_portable_build_without_avx512():
    """The source built without AVX-512 runs the portable loop and agrees with the AVX-512 build."""
    kernel, how = qk.build_quant_kernel(("-mno-avx512f",))
    assert kernel is not None and kernel.isa == "portable C", how
    for fmt, group in CASES:
        w = Q.quantize(torch.randn(1, 45, 70), fmt, group)
        x = torch.randn(9, 45)
        _assert_close(qk.kernel_quant_linear(x, w, kernel=kernel), qk.kernel_quant_linear(x, w), f"{fmt}/{group}")


def test_bf16_rows_and_path_names(monkeypatch):
    """bf16 rows give bf16 results within bf16 rounding; MOE_HOST_KERNEL=torch names the torch path."""
    qe = _expert("int4", 64, 64, 40)
    x = torch.randn(3, 64)
    w13, w2 = qe.dequantize(torch.float32)
    y = quant_host.host_quant_expert_forward(x.bfloat16(), qe[0])
    assert y.dtype == torch.bfloat16
    _assert_close(y.float(), grouped_mlp_reference(x, w13, w2, torch.tensor([3])), "bf16 rows", tol=3e-2)
    if KERNEL is not None and KERNEL.isa == "avx512":
        assert quant_host.host_quant_path("int4").startswith("int4: C kernel (avx512")
    monkeypatch.setenv("MOE_HOST_KERNEL", "torch")
    qk.quant_kernel.cache_clear()
    try:
        assert qk.quant_kernel() == (None, "torch (MOE_HOST_KERNEL=torch)")
        assert quant_host.host_quant_path("int8").startswith("int8: torch._weight_int8pack_mm")
        _assert_close(quant_host.host_quant_expert_forward(x, qe[0]), grouped_mlp_reference(
            x, w13, w2, torch.tensor([3])), "torch path")
    finally:
        qk.quant_kernel.cache_clear()


@needs_avx512
def test_int8_bf16_rows_past_the_limit_use_torchs_op():
    """bf16 rows on int8 go to the kernel up to INT8_KERNEL_MAX_ROWS, to torch._weight_int8pack_mm above;
    int4 / MXFP4 stay on the kernel; fp32 rows and gradients as documented."""
    lim = quant_host.INT8_KERNEL_MAX_ROWS
    w8, w4 = Q.quantize(torch.randn(1, 32, 16), "int8"), Q.quantize(torch.randn(1, 32, 16), "int4", 32)
    xb = torch.randn(lim + 1, 32).bfloat16()
    want_big = "torch" if quant_host._INT8_OP else "kernel"
    assert quant_host._impl(xb[:lim], w8, None) == "kernel" and quant_host._impl(xb, w8, None) == want_big
    assert quant_host._impl(xb, w4, None) == "kernel" and quant_host._impl(xb.float(), w8, None) == "kernel"
    assert quant_host._impl(torch.randn(2, 32, requires_grad=True), w4, None) == "torch"
    w48 = Q.quantize(torch.randn(1, 96, 16), "int4", 48)  # the AVX-512 tiles need whole 32-value chunks
    assert quant_host._impl(torch.randn(2, 96), w48, None) == "torch"


@needs_kernel
def test_portable_only_build_leaves_the_default_to_torch(monkeypatch):
    """Without AVX-512 the kernel's C loop is slower than torch's path: the default is torch there."""
    portable, how = qk.build_quant_kernel(("-mno-avx512f",))
    monkeypatch.setattr(quant_host, "quant_kernel", lambda: (portable, how))
    w4 = Q.quantize(torch.randn(1, 32, 16), "int4", 32)
    assert quant_host._impl(torch.randn(2, 32), w4, None) == "torch"
    assert "has no AVX-512 path" in quant_host.host_quant_path("int4")


def test_errors():
    qe = _expert("int4", 64, 64, 40)
    with pytest.raises(ValueError, match="impl='cuda' is not one of kernel, portable, torch"):
        quant_host.quant_linear(torch.randn(2, 64), qe.w13[0], impl="cuda")
    if KERNEL is not None:
        with pytest.raises(ValueError, match="needs host rows"):
            qk.kernel_quant_linear(torch.randn(2, 64), _bank_of_two())  # a bank, not one expert's weight


def _bank_of_two():
    return Q.quantize(torch.randn(2, 64, 8), "int4", 64)
