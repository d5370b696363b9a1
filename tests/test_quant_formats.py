"""Quantised expert formats (kernels/quant.py): round-trip error within each format's bound, exact
MXFP4 decode against transformers' gpt-oss dequantisation, byte accounting, flat-bank views, and
the quantised reference MLP against dequantise-then-reference.

Legend: E experts, K reduction dim, O output dim, D model dim, F expert hidden dim, N rows.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import single_thread  # noqa: F401  (autouse: one torch thread)

from moe_runtime.kernels import quant as Q
from moe_runtime.kernels.reference import grouped_mlp_reference

SHAPES = [(3, 64, 48), (2, 37, 29), (1, 130, 7), (2, 1, 5)]  # K, O not multiples of any group


@pytest.mark.parametrize("fmt,group", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128), ("mxfp4", None)])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_within_bound(fmt, group, shape):
    g = torch.Generator().manual_seed(sum(shape) * 7 + (group or 0))
    w = torch.randn(*shape, generator=g) * 0.05
    w[0, 0, 0] = 0.9  # an outlier: int8 / int4 / MX scales must absorb it
    qw = Q.quantize(w, fmt, group)
    deq = qw.dequantize(torch.float32)
    assert deq.shape == w.shape and deq.is_contiguous()
    err = (deq - w).abs()
    bound = Q.error_bound(qw, w)
    worst = (err - bound).max().item()
    assert worst <= 0, f"{fmt}/{group} {shape}: max error {err.max():.3g} exceeds its bound by {worst:.3g}"
    # and the bound is meaningful: relative error of the whole tensor is small
    rel = (err.norm() / w.norm()).item()
    assert rel < {"int8": 0.03, "int4": 0.15, "mxfp4": 0.2}[fmt], f"{fmt}: relative error {rel:.3f}"
    assert qw.nbytes == shape[0] * Q.weight_bytes(shape[1], shape[2], fmt, group)


def test_int4_constant_and_offset_groups():
    """All-equal groups and groups far from zero quantise without inf / NaN and within the bound."""
    w = torch.cat([torch.full((1, 64, 3), 7.25), torch.zeros(1, 64, 3), 5 + 1e-3 * torch.randn(1, 64, 3)], 0)
    qw = Q.quantize(w, "int4", 64)
    deq = qw.dequantize()
    assert torch.isfinite(deq).all()
    assert ((deq - w).abs() <= Q.error_bound(qw, w)).all()


def test_int8_and_int4_byte_ratio():
    """Bytes per expert: the Mixtral shape (D=4096, F=14336) is 352 MB in bf16."""
    D, F = 4096, 14336
    bf16 = Q.expert_bytes(D, F, "bf16")
    assert bf16 == 352_321_536
    assert 1.95 < bf16 / Q.expert_bytes(D, F, "int8") < 2.0
    assert 3.5 < bf16 / Q.expert_bytes(D, F, "int4", 64) < 3.6
    assert 3.7 < bf16 / Q.expert_bytes(D, F, "int4", 128) < 3.8
    assert 3.7 < bf16 / Q.expert_bytes(D, F, "mxfp4") < 3.8


def test_mxfp4_decode_matches_transformers():
    """Our decode of gpt-oss blocks/scales == transformers' convert_moe_packed_tensors, bit for bit."""
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(0)
    E, O, K = 2, 6, 96
    blocks = torch.randint(0, 256, (E, O, K // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 135, (E, O, K // 32), generator=g, dtype=torch.uint8)
    theirs = mx.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, K, O]
    qw = Q.QWeight("mxfp4", 32, K, O, {"q": blocks.reshape(E, O, K // 2), "scale": scales})
    ours = qw.dequantize(torch.float32)
    assert theirs.shape == ours.shape
    assert torch.equal(ours, theirs)
    # and quantising those values gives back the same codes' values (e2m1 grid points are exact)
    again = Q.quantize(ours, "mxfp4").dequantize()
    assert torch.equal(again, ours)


def test_mxfp4_spec_scale():
    """Shared exponent = floor(log2(amax)) - 2: a block with amax 6 * 2^k decodes exactly."""
    w = torch.zeros(1, 32, 1)
    w[0, :, 0] = torch.tensor([6.0, -3.0, 1.5, 0.5] * 8) * 2.0 ** -5
    qw = Q.quantize(w, "mxfp4")
    assert int(qw.fields["scale"][0, 0, 0]) == 127 - 5 + 0  # floor(log2(6 * 2^-5)) - 2 = -3 - 2 = -5
    assert torch.equal(qw.dequantize(), w)


def test_bad_format_errors():
    with pytest.raises(ValueError, match="not one of bf16, int8, int4, mxfp4"):
        Q.quantize(torch.zeros(1, 4, 4), "int3")
    with pytest.raises(ValueError, match="even number in 32..128"):
        Q.quantize(torch.zeros(1, 4, 4), "int4", 16)
    with pytest.raises(ValueError, match="NaN or inf"):
        Q.quantize(torch.full((1, 4, 4), float("nan")), "int8")


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_bank_views_round_trip(fmt):
    """A flat uint8 bank holds n experts; expert i's fields are views; a copy of each field moves it."""
    D, F, n = 40, 23, 3
    g = Q.DEFAULT_GROUP[fmt]
    w13, w2 = torch.randn(n, D, 2 * F), torch.randn(n, F, D)
    qe = Q.quantize_experts(w13, w2, fmt)
    flat = torch.zeros(Q.bank_nbytes(n, D, F, fmt, g), dtype=torch.uint8)
    bank = Q.bank_views(flat, n, D, F, fmt, g)
    for i in range(n):
        bank[i].copy_(qe[i])
    for a, b in zip(bank.dequantize(), qe.dequantize()):
        assert torch.equal(a, b)
    assert Q.bank_nbytes(n, D, F, fmt, g) - n * Q.expert_bytes(D, F, fmt) < 16 * 6


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_reference_mlp_equals_dequantised(fmt):
    """The quantised reference (one expert dequantised at a time) == grouped_mlp_reference on the
    dequantised bank, bit for bit in fp32 (same per-expert matmuls); an expert with no rows included."""
    D, F, E = 33, 19, 4
    g = torch.Generator().manual_seed(1)
    qe = Q.quantize_experts(torch.randn(E, D, 2 * F, generator=g) * 0.1, torch.randn(E, F, D, generator=g) * 0.1, fmt)
    counts = torch.tensor([3, 0, 5, 1])
    x = torch.randn(int(counts.sum()), D, generator=g)
    w13, w2 = qe.dequantize(torch.float32)
    expected = grouped_mlp_reference(x, w13, w2, counts)
    assert torch.equal(Q.grouped_mlp_quant_reference(x, qe, counts), expected)
