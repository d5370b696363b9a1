"""Cold quantised experts on host cores: the expert MLP straight from the store's quantised bytes.

Legend: N token rows routed to one expert, D model dim, F expert hidden dim, K / O a weight's
reduction / output dim, c output channels decoded at a time.

The host path reads each expert at its quantised size (the point of quantising: a host GEMV is
bound by the bytes it reads). Where the system C compiler builds it (offload/quant_kernel.py), a C
kernel multiplies rows straight from the store's int4 / MXFP4 / int8 bytes: each group's 16-entry
fp32 table, one AVX-512 lookup per 16 nibbles, fp32 FMA, no dequantised copy and no layout
conversion (bench/results/quant_quality.md, "Host expert path"). Without a compiler (or with
MOE_HOST_KERNEL=torch) the torch path runs: int8 with bf16 rows through torch's CPU op
`torch._weight_int8pack_mm` (int8 [O, K] weights and per-channel scales: our int8 layout as it is);
int4 and MXFP4 (and int8 in fp32) decode c output channels at a time into a small fp32 tile that
stays in cache and multiply it at once. Both paths: fp32 products and sums, each GEMV's result
rounded to the rows' dtype, SwiGLU in that dtype in between (the same roundings as the resident
model's expert). torch's `_weight_int4pack_mm_for_cpu` wants its own tinygemm layout (K a multiple of
the group, a second host copy of every expert, an affine zero convention of its own) and cannot
serve MXFP4, so it is not used.

Entry point for the runtime (offload/runtime.py) and for the coordinator's dispatch from
offload/cpu_experts.py: `host_quant_expert_forward(x_ND, experts_1)`.
"""
from __future__ import annotations

import torch

from moe_runtime.core.experts import compute_dtype
from moe_runtime.kernels.quant import E2M1_VALUES, QuantExperts, QWeight
from moe_runtime.kernels.reference import swiglu
from moe_runtime.offload.quant_kernel import kernel_quant_linear, quant_kernel

_INT8_OP = hasattr(torch, "_weight_int8pack_mm")
_E2M1 = torch.tensor(E2M1_VALUES)
_E2M1_LO = _E2M1[torch.arange(256) & 0x0F].contiguous()
"""e2m1 value of a byte's low nibble (even k), indexed by the byte."""
_E2M1_HI = _E2M1[torch.arange(256) >> 4].contiguous()


def _chunk(K: int) -> int:
    """Output channels per decoded tile: about 1 MiB of fp32 weights (fewer, larger ops; measured best
    of 64..8192 channels at K=1024 on the benchmark machine)."""
    return max(16, (1 << 18) // max(K, 1))


IMPLS = ("kernel", "portable", "torch")
"""quant_linear's paths: the C kernel (AVX-512 where built), its portable C loop, torch ops."""


INT8_KERNEL_MAX_ROWS = 16
"""bf16 rows on int8 experts: up to this many the C kernel, above it torch._weight_int8pack_mm (its
blocking reuses each weight load across rows; at 32 rows it matched the kernel, at 64 it was ~1.3x faster
on the benchmark machine). int4 / MXFP4 run the kernel at every N (~1.4x faster than torch's decode
tiles even at 64 rows there)."""


def _kernel_is_fast(kernel, w: QWeight) -> bool:
    """The AVX-512 build on a format / group it vectorises. Its portable C loop (no AVX-512, or an int4
    group that is not a multiple of 32) was slower than the torch path on the benchmark machine (int4
    ~1.05x, int8 ~10x torch's time at N=1), so those run torch's path by default."""
    return kernel is not None and kernel.isa == "avx512" and (w.fmt != "int4" or w.group % 32 == 0)


def _impl(x_NK: torch.Tensor, w: QWeight, impl: str | None) -> str:
    """The path for these rows: `impl`, or the C kernel where it is built and no gradient is wanted."""
    if impl is not None:
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {', '.join(IMPLS)}")
        return impl
    grads = torch.is_grad_enabled() and x_NK.requires_grad
    kernel = quant_kernel()[0]
    if grads or x_NK.device.type != "cpu" or not _kernel_is_fast(kernel, w):
        return "torch"
    big_int8 = w.fmt == "int8" and x_NK.dtype == torch.bfloat16 and _INT8_OP and x_NK.shape[0] > INT8_KERNEL_MAX_ROWS
    return "torch" if big_int8 else "kernel"


def host_quant_path(fmt: str) -> str:
    """What host_quant_expert_forward runs for experts of format `fmt` (recorded in the calibration)."""
    kernel, how = quant_kernel()
    if kernel is not None and kernel.isa == "avx512":
        above = f"; torch._weight_int8pack_mm above {INT8_KERNEL_MAX_ROWS} bf16 rows" if fmt == "int8" and _INT8_OP else ""
        groups = "; torch for groups not a multiple of 32" if fmt == "int4" else ""
        return f"{fmt}: {how}, {torch.get_num_threads()} thread(s){above}{groups}"
    torch_path = "torch._weight_int8pack_mm for bf16 rows" if fmt == "int8" and _INT8_OP else "torch decode tiles"
    why = how if kernel is None else f"the {how} has no AVX-512 path, slower than torch's"
    return f"{fmt}: {torch_path} ({why})"


def quant_linear(x_NK: torch.Tensor, w: QWeight, chunk_channels: int | None = None, *,
                 impl: str | None = None) -> torch.Tensor:
    """x_NK @ W_KO of one quantised expert weight (w holds n == 1) on the host, in x's dtype.
    impl: one of IMPLS (default: the C kernel where built, else torch); chunk_channels: torch path only."""
    if w.n != 1:
        raise ValueError(f"quant_linear takes one expert's weight, got a bank of {w.n}")
    if x_NK.shape[1] != w.K:
        raise ValueError(f"rows have {x_NK.shape[1]} columns but the weight's reduction dim is {w.K}")
    path = _impl(x_NK, w, impl)
    if path != "torch":
        return kernel_quant_linear(x_NK, w, portable=path == "portable").to(x_NK.dtype)
    if w.fmt == "int8" and x_NK.dtype == torch.bfloat16 and _INT8_OP and x_NK.shape[0] > 0:
        return torch._weight_int8pack_mm(x_NK.contiguous(), w.fields["q"][0], w.fields["scale"][0, :, 0].to(x_NK.dtype))
    c = chunk_channels or _chunk(w.K)
    if w.fmt in ("int4", "mxfp4"):
        return _nibble_linear(x_NK, w, c)
    x32 = x_NK.float()
    out = torch.empty(x_NK.shape[0], w.O)
    for o0 in range(0, w.O, c):
        tile_CK = w.decode_rows(slice(o0, o0 + c))[0]  # fp32, output-major: no transpose, no copy
        out[:, o0:o0 + tile_CK.shape[0]] = torch.nn.functional.linear(x32, tile_CK)
    return out.to(x_NK.dtype)


def _nibble_linear(x_NK: torch.Tensor, w: QWeight, c: int) -> torch.Tensor:
    """x @ W for int4 / mxfp4 without interleaving nibbles: even k (low nibbles) and odd k (high
    nibbles) are two half-width GEMMs against x[:, 0::2] and x[:, 1::2]; a group of G values is G/2
    bytes, so each byte column keeps its group. int4's zero leaves the tile: x (q - z) s =
    (x q) s - (sum_g x) z s, a [N, nG] x [nG, c] correction. Each tile is decoded in place (3 passes)."""
    blk = w.group if w.fmt == "int4" else 32
    half, K = blk // 2, w.K
    nG = -(-K // blk)
    x32 = torch.nn.functional.pad(x_NK.float(), (0, nG * blk - K))
    x_even, x_odd = x32[:, 0::2].contiguous(), x32[:, 1::2].contiguous()  # [N, nG * half] each
    q_all = w.fields["q"][0]
    if q_all.shape[1] < nG * half:
        q_all = torch.nn.functional.pad(q_all, (0, nG * half - q_all.shape[1]))
    if w.fmt == "int4":
        scale, zero = w.fields["scale"][0].float(), w.fields["zero"][0].float()  # [O, nG]
        xsum_NG = x32.view(-1, nG, blk).sum(-1)
    else:
        pow2 = torch.ldexp(torch.ones(()), (w.fields["scale"][0].to(torch.int32) - 127).float())  # [O, nG]
    out = torch.empty(x_NK.shape[0], w.O)
    for o0 in range(0, w.O, c):
        q = q_all[o0:o0 + c]
        n = q.shape[0]
        acc = None
        if w.fmt == "int4":
            halves = ((q & 0x0F, x_even), (q >> 4, x_odd))
        else:  # e2m1 values straight from the byte: an int32 index_select (int64 indexing is ~3x slower)
            qi = q.reshape(-1).int()
            halves = ((_E2M1_LO.index_select(0, qi), x_even), (_E2M1_HI.index_select(0, qi), x_odd))
        for codes, xs in halves:
            if w.fmt == "int4":
                t = codes.float().view(n, nG, half).mul_(scale[o0:o0 + n, :, None])
            else:
                t = codes.view(n, nG, half).mul_(pow2[o0:o0 + n, :, None])
            part = torch.nn.functional.linear(xs, t.view(n, nG * half))
            acc = part if acc is None else acc.add_(part)
        if w.fmt == "int4":
            acc.sub_(xsum_NG @ (zero[o0:o0 + n] * scale[o0:o0 + n]).T)
        out[:, o0:o0 + n] = acc
    return out.to(x_NK.dtype)


def host_quant_expert_forward(x_ND: torch.Tensor, expert: QuantExperts, *,
                              chunk_channels: int | None = None, impl: str | None = None) -> torch.Tensor:
    """One quantised expert's SwiGLU MLP on host cores from its (host) bytes; x may live on a device
    (its rows move, the weights do not). expert: QuantExperts of n == 1 (store.quant_expert(l, e)).
    impl: quant_linear's path (default: the C kernel where built, else torch)."""
    dtype = compute_dtype(x_ND)
    x_host = x_ND.to("cpu", dtype)  # host sync when x is on a device: N activation rows come over
    h = quant_linear(x_host, expert.w13, chunk_channels, impl=impl)
    y = quant_linear(swiglu(h), expert.w2, chunk_channels, impl=impl)
    return y if x_ND.device.type == "cpu" else y.to(x_ND.device, non_blocking=True)


__all__ = ["IMPLS", "host_quant_expert_forward", "host_quant_path", "quant_linear"]


def calibrate_store(store, pool, copy_engine, *, attn_probe=None, token_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
                    repeats: int = 3):
    """The cost model's calibration for any store: offload/cpu_experts.calibrate for float experts;
    for quantised ones the same measurements (copy of one expert's quantised bytes, one expert on the
    host from the store and on the device from a slot, activation moves, attention) on the quantised paths."""
    from moe_runtime import kernels
    from moe_runtime.offload.cpu_experts import calibrate
    quant = store.layout.quant
    if quant is None:
        return calibrate(store, pool, copy_engine, token_grid=token_grid, repeats=repeats, attn_probe=attn_probe)
    return calibrate(store, pool, copy_engine, token_grid=token_grid, repeats=repeats, attn_probe=attn_probe,
                     host_run=lambda x, counts, key: host_quant_expert_forward(x, store.quant_expert(*key)),
                     device_run=lambda x, counts: kernels.grouped_mlp_quant(x, pool.quant[0], counts),
                     path=host_quant_path(quant))


__all__ += ["calibrate_store"]


@torch.no_grad()
def quantize_dequantize_banks(model, expert_dtype: str, group: int | None = None) -> None:
    """Replace every ExpertBank's weights with dequantise(quantise(w)) in place: the resident model
    "with the same quantised weights" that an engine with expert_dtype=... must reproduce token for
    token, and the model the quality benchmark scores. bf16: nothing changes."""
    from moe_runtime.core.experts import ExpertBank
    from moe_runtime.kernels.quant import quantize_experts
    if expert_dtype == "bf16":
        return
    for mod in model.modules():
        if isinstance(mod, ExpertBank):
            qe = quantize_experts(mod.w13_EDF2, mod.w2_EFD, expert_dtype, group)
            w13, w2 = qe.dequantize(mod.w13_EDF2.dtype)
            mod.w13_EDF2.copy_(w13)
            mod.w2_EFD.copy_(w2)


__all__ += ["quantize_dequantize_banks"]
