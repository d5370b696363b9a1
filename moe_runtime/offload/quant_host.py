"""Cold quantised experts on host cores: the expert MLP straight from the store's quantised bytes.

Legend: N token rows routed to one expert, D model dim, F expert hidden dim, K / O a weight's
reduction / output dim, c output channels decoded at a time.

The host path reads each expert at its quantised size (the point of quantising: a host GEMV is
bound by the bytes it reads). int8 with bf16 rows goes through torch's CPU op
`torch._weight_int8pack_mm` (int8 [O, K] weights and per-channel scales: our int8 layout as it
is). int4 and MXFP4 (and int8 in fp32) decode c output channels at a time into a small fp32/bf16
tile that stays in cache and multiply it at once, so no dequantised copy of an expert, let alone a
layer, is ever made. torch's `_weight_int4pack_mm_for_cpu` wants its own tinygemm layout
(K a multiple of the group, a second host copy of every expert), so it is not used.

Entry point for the runtime (offload/runtime.py) and for the coordinator's dispatch from
offload/cpu_experts.py: `host_quant_expert_forward(x_ND, experts_1)`.
"""
from __future__ import annotations

import torch

from moe_runtime.core.experts import compute_dtype
from moe_runtime.kernels.quant import QuantExperts, QWeight
from moe_runtime.kernels.reference import swiglu

_INT8_OP = hasattr(torch, "_weight_int8pack_mm")


def _chunk(K: int) -> int:
    """Output channels per decoded tile: about 256 KiB of fp32 weights (an L2's worth)."""
    return max(16, (1 << 16) // max(K, 1))


def quant_linear(x_NK: torch.Tensor, w: QWeight, chunk_channels: int | None = None) -> torch.Tensor:
    """x_NK @ W_KO of one quantised expert weight (w holds n == 1) on the host, in x's dtype."""
    if w.n != 1:
        raise ValueError(f"quant_linear takes one expert's weight, got a bank of {w.n}")
    if x_NK.shape[1] != w.K:
        raise ValueError(f"rows have {x_NK.shape[1]} columns but the weight's reduction dim is {w.K}")
    if w.fmt == "int8" and x_NK.dtype == torch.bfloat16 and _INT8_OP and x_NK.shape[0] > 0:
        return torch._weight_int8pack_mm(x_NK.contiguous(), w.fields["q"][0], w.fields["scale"][0, :, 0].to(x_NK.dtype))
    c = chunk_channels or _chunk(w.K)
    out = x_NK.new_empty(x_NK.shape[0], w.O)
    for o0 in range(0, w.O, c):
        tile_KC = w.dequantize(x_NK.dtype, rows=slice(o0, o0 + c))[0]
        torch.matmul(x_NK, tile_KC, out=out[:, o0:o0 + tile_KC.shape[1]])
    return out


def host_quant_expert_forward(x_ND: torch.Tensor, expert: QuantExperts, *,
                              chunk_channels: int | None = None) -> torch.Tensor:
    """One quantised expert's SwiGLU MLP on host cores from its (host) bytes; x may live on a device
    (its rows move, the weights do not). expert: QuantExperts of n == 1 (store.quant_expert(l, e))."""
    dtype = compute_dtype(x_ND)
    x_host = x_ND.to("cpu", dtype)  # host sync when x is on a device: N activation rows come over
    y = quant_linear(swiglu(quant_linear(x_host, expert.w13, chunk_channels)), expert.w2, chunk_channels)
    return y if x_ND.device.type == "cpu" else y.to(x_ND.device, non_blocking=True)


__all__ = ["host_quant_expert_forward", "quant_linear"]
