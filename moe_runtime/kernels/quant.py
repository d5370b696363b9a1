"""Quantised expert weights: int8 (per output channel), int4 (group-wise, scale + zero) and MXFP4.

Legend: E experts, K a weight's reduction (input) dim, O its output dim, G group size along K,
nG = cdiv(K, G) groups, D model dim, F expert hidden dim. A weight is used as x_NK @ W_KO.

Library choice: our own packing. The expert cache needs one fixed byte layout per expert that is
(a) the same in the host store, in a device slot and on disk, so a copy is a few memcpys of raw
bytes; (b) addressable per expert inside a stacked [E, ...] bank, so one grouped Triton launch
covers a layer; (c) decodable inside a Triton weight load. torchao's int4/int8 tensor subclasses
(tinygemm / `_convert_weight_to_int4pack` layouts) are per-Linear and device-specific (the packed
CUDA layout differs from the CPU one), so a slot could not receive the store's bytes as they are;
HQQ and bitsandbytes likewise wrap nn.Linear with their own layouts and would add a dependency
whose kernels cannot run a grouped [E, D, 2F] layout. MXFP4 must decode exactly as gpt-oss
checkpoints ship it. So every format here stores, per expert and weight, "output-major" tensors
[O, K'] (K contiguous, like nn.Linear.weight and gpt-oss' blocks), and the kernels decode them.

Formats (per weight W_KO of one expert; fields are tensors with a leading expert dim in a bank):
    int8   q int8 [O, K]; scale fp32 [O, 1].      W[k, o] = q[o, k] * scale[o]
           symmetric, per output channel: scale = max_k |W[:, o]| / 127; |error| <= scale / 2
    int4   q uint8 [O, cdiv(K, 2)]  two values per byte, even k in the low nibble;
           scale fp16 [O, nG], zero fp16 [O, nG]. W[k, o] = (q[o, k] - zero[o, g]) * scale[o, g], g = k // G
           asymmetric min-max per group (G in 32..128): scale = (max - min) / 15 rounded UP to fp16,
           zero = -min / scale in fp16; |error| <= scale * (1/2 + |zero| * 2^-11) (half a step plus the
           zero's fp16 rounding; for ordinary weights, min <= 0 <= max, that is <= 0.51 * scale)
    mxfp4  q uint8 [O, cdiv(K, 2)]  e2m1 codes (OCP MX v1.0), even k in the low nibble;
           scale uint8 [O, cdiv(K, 32)] e8m0 (bias 127). W[k, o] = e2m1(q[o, k]) * 2^(scale[o, k // 32] - 127)
           exactly transformers' gpt-oss decode (integrations/mxfp4.py, convert_moe_packed_tensors);
           quantising uses the spec's shared exponent floor(log2(amax)) - 2 and round-to-nearest
    bf16   no quantisation (the store's plain float layout, offload/store.py).
Padding: K is padded to the packing / group size with zeros in the codes; the padding is never read
back (dequantise trims to K) and the kernels mask it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FORMATS = ("int8", "int4", "mxfp4")
EXPERT_DTYPES = ("bf16", *FORMATS)
"""Values of --expert-dtype / OffloadConfig(expert_dtype=...)."""
DEFAULT_GROUP = {"int8": 0, "int4": 64, "mxfp4": 32}
"""Group size along K per format; 0 means one group per output channel (all of K)."""
MX_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""Code -> value of e2m1 (transformers' FP4_VALUES): bit 3 sign, bits 2..1 exponent, bit 0 mantissa."""


def check_format(fmt: str, group: int | None = None) -> int:
    """The group size of `fmt` (validated); ValueError naming the fix otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"expert dtype {fmt!r} is not one of {', '.join(EXPERT_DTYPES)}; pick one of those")
    g = DEFAULT_GROUP[fmt] if group is None else int(group)
    if fmt == "int4" and not (32 <= g <= 128 and g % 2 == 0):
        raise ValueError(f"int4 group size {g} must be an even number in 32..128 (64 is the default)")
    if fmt == "mxfp4" and g != MX_BLOCK:
        raise ValueError(f"mxfp4 has a fixed block of {MX_BLOCK} values per scale; got group {g}")
    if fmt == "int8" and g != 0:
        raise ValueError(f"int8 is per output channel (group 0); got group {g}")
    return g


def field_specs(fmt: str, K: int, O: int, group: int) -> list[tuple[str, torch.dtype, tuple[int, int]]]:
    """(name, dtype, per-expert shape) of each tensor that stores one [K, O] weight in `fmt`."""
    if fmt == "int8":
        return [("q", torch.int8, (O, K)), ("scale", torch.float32, (O, 1))]
    half = (K + 1) // 2
    if fmt == "int4":
        nG = math.ceil(K / group)
        return [("q", torch.uint8, (O, half)), ("scale", torch.float16, (O, nG)), ("zero", torch.float16, (O, nG))]
    if fmt == "mxfp4":
        return [("q", torch.uint8, (O, half)), ("scale", torch.uint8, (O, math.ceil(K / MX_BLOCK)))]
    raise ValueError(f"unknown quantised format {fmt!r}; one of {', '.join(FORMATS)}")


def _field_bytes(dtype: torch.dtype, shape: tuple[int, int]) -> int:
    return shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()


def weight_bytes(K: int, O: int, fmt: str, group: int | None = None) -> int:
    """Bytes of one [K, O] weight of one expert in `fmt` (bf16: 2 bytes a value)."""
    if fmt == "bf16":
        return 2 * K * O
    g = check_format(fmt, group)
    return sum(_field_bytes(dt, shape) for _, dt, shape in field_specs(fmt, K, O, g))


def expert_bytes(d_model: int, d_expert: int, fmt: str, group: int | None = None) -> int:
    """Bytes of one routed SwiGLU expert (W13 [D, 2F] and W2 [F, D]) in `fmt`: what a copy moves,
    what a slot holds and what the host store keeps per expert. For the cost model and simulator."""
    return weight_bytes(d_model, 2 * d_expert, fmt, group) + weight_bytes(d_expert, d_model, fmt, group)


# ---------------------------------------------------------------- one weight in a format

@dataclass
class QWeight:
    """A stack of n quantised [K, O] weights: fields {name: [n, *shape]} as in field_specs."""

    fmt: str
    group: int
    K: int
    O: int
    fields: dict[str, torch.Tensor]

    def __getitem__(self, idx) -> "QWeight":
        """Experts idx (an int keeps a leading dim of 1, so a single expert is a bank of one)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return QWeight(self.fmt, self.group, self.K, self.O, {k: v[idx] for k, v in self.fields.items()})

    @property
    def n(self) -> int:
        return next(iter(self.fields.values())).shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.fields.values())

    def copy_(self, src: "QWeight", non_blocking: bool = False) -> None:
        for k, t in self.fields.items():
            t.copy_(src.fields[k], non_blocking=non_blocking)

    def to(self, device) -> "QWeight":
        return QWeight(self.fmt, self.group, self.K, self.O, {k: v.to(device) for k, v in self.fields.items()})

    def decode_rows(self, rows: slice) -> torch.Tensor:
        """fp32 [n, o1 - o0, K] output-major weights of output channels rows (the host path's tiles)."""
        return _decode(self.fmt, self.group, self.K, {k: v[:, rows] for k, v in self.fields.items()})

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
        """[n, K, O] contiguous weights (rows: a slice of output channels O, then [n, K, o1-o0])."""
        f = self.fields if rows is None else {k: v[:, rows] for k, v in self.fields.items()}
        w_nOK = _decode(self.fmt, self.group, self.K, f)
        return w_nOK.transpose(1, 2).to(dtype).contiguous()


def _unpack_nibbles(q_nOH: torch.Tensor, K: int) -> torch.Tensor:
    """uint8 [n, O, H] -> int codes [n, O, K]: even k from the low nibble (gpt-oss order)."""
    lo, hi = q_nOH & 0x0F, q_nOH >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)[..., :K]


def _e2m1_lut(device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def _decode(fmt: str, group: int, K: int, f: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 [n, O, K] from the fields (groups by reshaping, no gathers: the host path runs this per tile)."""
    if fmt == "int8":
        return f["q"].float() * f["scale"]
    blk = group if fmt == "int4" else MX_BLOCK
    q = f["q"]
    n, O, H = q.shape
    nG = math.ceil(K / blk)
    codes = _unpack_nibbles(q, 2 * H)  # uint8 [n, O, 2H]
    if nG * blk > 2 * H:
        codes = torch.nn.functional.pad(codes, (0, nG * blk - 2 * H))
    codes = codes.view(n, O, nG, blk)
    if fmt == "int4":
        return ((codes.float() - f["zero"].float()[..., None]) * f["scale"].float()[..., None]).view(n, O, -1)[..., :K]
    # e2m1 through its 16-entry table (measured faster than integer arithmetic on the host), then the
    # block's 2^(scale - 127): exactly transformers' lut[...] and ldexp
    w = torch.ldexp(_e2m1_lut(codes.device)[codes.long()], (f["scale"].to(torch.int32) - 127).float()[..., None])
    return w.view(n, O, nG * blk)[..., :K]


def quantize(w_nKO: torch.Tensor, fmt: str, group: int | None = None) -> QWeight:
    """Quantise n weights [n, K, O] (any float dtype; computed in fp32) into `fmt`."""
    g = check_format(fmt, group)
    if w_nKO.dim() != 3:
        raise ValueError(f"quantize takes a stack of weights [n, K, O], got shape {tuple(w_nKO.shape)}")
    n, K, O = w_nKO.shape
    w = w_nKO.detach().float().transpose(1, 2)  # [n, O, K]
    if not torch.isfinite(w).all():
        raise ValueError("weights to quantise contain NaN or inf; fix the checkpoint before quantising")
    if fmt == "int8":
        scale = w.abs().amax(-1, keepdim=True) / 127
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
        return QWeight(fmt, g, K, O, {"q": q.contiguous(), "scale": scale.contiguous()})
    blk = g if fmt == "int4" else MX_BLOCK
    nG = math.ceil(K / blk)
    wp = torch.nn.functional.pad(w, (0, nG * blk - K)).view(n, O, nG, blk)
    if fmt == "int4":
        # the padding of the last group is left out of its min / max
        valid = (torch.arange(nG * blk, device=w.device) < K).view(nG, blk)
        lo = torch.where(valid, wp, torch.inf).amin(-1)
        hi = torch.where(valid, wp, -torch.inf).amax(-1)
        # floors: fp16's normal range (never a zero scale), and |zero| = |min| / scale within fp16
        scale32 = torch.maximum(((hi - lo) / 15).clamp_min(2.0 ** -14), lo.abs() / 60000)
        scale = _round_up_fp16(scale32)
        zero = (-lo / scale.float()).to(torch.float16)
        codes = torch.round(wp / scale.float()[..., None] + zero.float()[..., None]).clamp(0, 15)
        fields = {"scale": scale.contiguous(), "zero": zero.contiguous()}
    else:
        amax = wp.abs().amax(-1)
        # OCP MX: shared exponent = floor(log2(amax)) - emax(e2m1) (= 2); all-zero blocks get 2^-127
        e = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp_min(2.0 ** -127))) - 2, torch.full_like(amax, -127))
        e = e.clamp(-127, 127)
        codes = _e2m1_encode(torch.ldexp(wp, -e[..., None]))
        fields = {"scale": (e + 127).to(torch.uint8).contiguous()}
    codes = codes.to(torch.uint8).view(n, O, nG * blk)[..., :K]
    fields["q"] = _pack_nibbles(codes)
    return QWeight(fmt, g, K, O, {name: fields[name] for name, _, _ in field_specs(fmt, K, O, g)})


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16, never below x (so (max - min) / scale <= 15 and no code is clamped)."""
    h = x.to(torch.float16)
    low = h.float() < x
    return torch.where(low, torch.nextafter(h, torch.full_like(h, torch.inf)), h)


_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code of each value, saturating at +-6, ties to the even code (the spec's rounding).
    bucketize against the midpoints puts a tie on the lower code; ties at odd midpoints (0.75, 1.75,
    3.5) belong to the upper, even code. O(1) extra memory per value (no distance table)."""
    a = v.abs().clamp_max(6.0).contiguous()
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=a.dtype, device=a.device)
    code = torch.bucketize(a, mids, right=False)
    tie_up = (code % 2 == 1) & (a == mids[(code).clamp_max(len(_E2M1_MIDPOINTS) - 1)])
    code = code + tie_up.to(code.dtype)
    sign = ((v < 0) & (code > 0)).to(code.dtype) * 8
    return code + sign


def _pack_nibbles(codes_nOK: torch.Tensor) -> torch.Tensor:
    """[n, O, K] codes 0..15 -> uint8 [n, O, cdiv(K, 2)], even k in the low nibble."""
    K = codes_nOK.shape[-1]
    if K % 2:
        codes_nOK = torch.nn.functional.pad(codes_nOK, (0, 1))
    pairs = codes_nOK.view(*codes_nOK.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()


def error_bound(qw: QWeight, w_nKO: torch.Tensor) -> torch.Tensor:
    """[n, K, O] the largest |w - dequantize(quantize(w))| the format allows for each value."""
    K = qw.K
    f = qw.fields
    if qw.fmt == "int8":
        return (f["scale"] / 2).transpose(1, 2).expand(-1, K, -1)
    if qw.fmt == "int4":
        g_idx = torch.arange(K) // qw.group
        s, z = f["scale"].float()[..., g_idx], f["zero"].float()[..., g_idx]
        return (s * (0.5 + z.abs() * 2.0 ** -11) * (1 + 1e-6)).transpose(1, 2)
    # mxfp4: half the e2m1 gap around |w| / X, or the saturation error above 6
    X = torch.ldexp(torch.ones(()), (f["scale"].to(torch.int32) - 127)[..., torch.arange(K) // MX_BLOCK].float())
    a = w_nKO.detach().float().abs().transpose(1, 2) / X
    half_gap = torch.where(a <= 2, 0.25, torch.where(a <= 4, 0.5, 1.0))
    return (X * torch.maximum(half_gap, a - 6)).transpose(1, 2) * (1 + 1e-6)


# ---------------------------------------------------------------- a bank of experts

@dataclass
class QuantExperts:
    """n quantised SwiGLU experts: w13 (K=D, O=2F, output channels [gate | up]) and w2 (K=F, O=D)."""

    w13: QWeight
    w2: QWeight

    @property
    def fmt(self) -> str:
        return self.w13.fmt

    @property
    def n(self) -> int:
        return self.w13.n

    def __getitem__(self, idx) -> "QuantExperts":
        return QuantExperts(self.w13[idx], self.w2[idx])

    def copy_(self, src: "QuantExperts", non_blocking: bool = False) -> None:
        self.w13.copy_(src.w13, non_blocking)
        self.w2.copy_(src.w2, non_blocking)

    def to(self, device) -> "QuantExperts":
        return QuantExperts(self.w13.to(device), self.w2.to(device))

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_nDF2, w2_nFD) contiguous, in `dtype`."""
        return self.w13.dequantize(dtype), self.w2.dequantize(dtype)


def quantize_experts(w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor, fmt: str, group: int | None = None) -> QuantExperts:
    """Quantise a bank's stacked weights."""
    return QuantExperts(quantize(w13_EDF2, fmt, group), quantize(w2_EFD, fmt, group))


def region_specs(d_model: int, d_expert: int, fmt: str, group: int) -> list[tuple[str, str, torch.dtype, tuple]]:
    """(weight, field, dtype, per-expert shape) of every region of a flat quantised bank, in order."""
    out = [("w13", name, dt, shape) for name, dt, shape in field_specs(fmt, d_model, 2 * d_expert, group)]
    return out + [("w2", name, dt, shape) for name, dt, shape in field_specs(fmt, d_expert, d_model, group)]


ALIGN = 16


def bank_nbytes(n: int, d_model: int, d_expert: int, fmt: str, group: int) -> int:
    """Bytes of a flat buffer holding n experts (each region starts 16-byte aligned)."""
    at = 0
    for _, _, dt, shape in region_specs(d_model, d_expert, fmt, group):
        at = _align(at) + n * _field_bytes(dt, shape)
    return _align(at)


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


def bank_views(flat_u8: torch.Tensor, n: int, d_model: int, d_expert: int, fmt: str, group: int) -> QuantExperts:
    """QuantExperts views of a flat uint8 buffer holding n experts: one region per field, so expert i
    is one contiguous chunk of each region and experts [a, b) are contiguous views of every region."""
    if flat_u8.dtype != torch.uint8 or flat_u8.dim() != 1:
        raise ValueError(f"a quantised bank lives in a flat uint8 buffer, got {flat_u8.dtype} {tuple(flat_u8.shape)}")
    need = bank_nbytes(n, d_model, d_expert, fmt, group)
    if flat_u8.numel() < need:
        raise ValueError(f"buffer of {flat_u8.numel()} bytes is smaller than the {need} that {n} experts need")
    fields: dict[str, dict[str, torch.Tensor]] = {"w13": {}, "w2": {}}
    at = 0
    for weight, name, dt, shape in region_specs(d_model, d_expert, fmt, group):
        at = _align(at)
        nb = n * _field_bytes(dt, shape)
        fields[weight][name] = flat_u8[at:at + nb].view(dt).view(n, *shape)
        at += nb
    return QuantExperts(QWeight(fmt, group, d_model, 2 * d_expert, fields["w13"]),
                        QWeight(fmt, group, d_expert, d_model, fields["w2"]))


# ---------------------------------------------------------------- reference compute

def grouped_mlp_quant_reference(x_sorted_ND: torch.Tensor, experts: QuantExperts,
                                counts_E: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert MLP over rows sorted by expert with quantised weights: one expert at a time is
    dequantised (never a whole layer) into x's dtype, then exactly reference.grouped_mlp_reference's
    math for that expert. x_sorted_ND: [N, D]; counts_E: [E] (sum N). Returns [N, D] in x's dtype."""
    from moe_runtime.kernels.reference import swiglu
    sizes = counts_E.tolist()  # host sync: the loop needs the counts as Python ints (reference path)
    if len(sizes) != experts.n:
        raise ValueError(f"counts_E has {len(sizes)} entries but {experts.n} quantised experts were given")
    outs = []
    for e, xe in enumerate(torch.split(x_sorted_ND, sizes, dim=0)):
        if xe.shape[0] == 0:
            outs.append(xe.new_zeros(0, x_sorted_ND.shape[1]))
            continue
        w13, w2 = experts[e].dequantize(x_sorted_ND.dtype)
        outs.append(swiglu(xe @ w13[0]) @ w2[0])
    return torch.cat(outs, dim=0) if outs else x_sorted_ND.new_zeros(0, x_sorted_ND.shape[1])


__all__ = ["FORMATS", "EXPERT_DTYPES", "DEFAULT_GROUP", "QWeight", "QuantExperts", "quantize", "quantize_experts",
           "expert_bytes", "weight_bytes", "error_bound", "bank_nbytes", "bank_views", "region_specs",
           "grouped_mlp_quant_reference", "check_format", "E2M1_VALUES"]
