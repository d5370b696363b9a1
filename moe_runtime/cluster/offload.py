"""Host-memory expert shards for training (ZeRO-Offload style, for the experts only).

Legend: N routed rows, D model dim, F expert hidden dim, El local experts, L MoE layers.

With `offload_experts`, each rank's expert weights (and so their gradients and AdamW state) live
in host memory, pinned when a GPU is used. A layer's shard is brought to the compute device just
before use and dropped after, with the NEXT layer's shard copied one layer ahead on a side CUDA
stream (the previous layer's in backward). The expert MLP does not keep the device weights for
backward: backward fetches them again and recomputes the expert forward (one extra expert forward
per step, the throughput cost), then sends the weight gradients to the host, where the optimizer
steps them on the CPU. So the device holds at most two layers' expert weights instead of L layers
of weights + gradients + two AdamW moments.

On a CPU-only run host == device: the same path runs (fetches become copies into fresh buffers,
the optimizer steps the same tensors), so it is tested for exact equivalence without a GPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from moe_runtime import kernels
from moe_runtime.core.experts import ExpertActivation, ExpertBank, compute_dtype
from moe_runtime.core.model import MoETransformer


class ExpertStreamer:
    """Device copies of the layers' host shards: the current layer and the one prefetched."""

    def __init__(self, banks: list["HostExpertBank"], device: torch.device):
        self.banks, self.device = banks, device
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = {}
        self.stats = {"requests": 0, "prefetch_hits": 0, "fetches": 0, "bytes_copied": 0, "peak_device_bytes": 0}

    def weights(self, layer: int, direction: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's (w13_EDF2, w2_EFD) on the device; prefetch layer + direction (+1 fwd, -1 bwd)."""
        self.stats["requests"] += 1
        if layer in self.slots:
            self.stats["prefetch_hits"] += 1
        else:
            self._fetch(layer)
        w13, w2, ready = self.slots[layer]
        if ready is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ready)  # device-side wait (no host sync): compute waits for this layer's copy
            w13.record_stream(cur)
            w2.record_stream(cur)
        nxt = layer + direction
        for k in [k for k in self.slots if k not in (layer, nxt)]:
            del self.slots[k]
        if 0 <= nxt < len(self.banks) and nxt not in self.slots:
            self._fetch(nxt)
        resident = sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.slots.values())
        self.stats["peak_device_bytes"] = max(self.stats["peak_device_bytes"], resident)
        return w13, w2

    def _fetch(self, layer: int) -> None:
        bank = self.banks[layer]
        src13, src2 = bank.w13_EDF2.detach(), bank.w2_EFD.detach()
        if self.copy_stream is None:
            # host == device: still copy, so compute reads a fetched buffer exactly as on a GPU.
            w13, w2, ready = src13.clone(), src2.clone(), None
        else:
            with torch.cuda.stream(self.copy_stream):
                w13 = src13.to(self.device, non_blocking=True)  # pinned host -> device, async
                w2 = src2.to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
        self.slots[layer] = (w13, w2, ready)
        self.stats["fetches"] += 1
        self.stats["bytes_copied"] += bank.shard_bytes

    def invalidate(self) -> None:
        """Drop every device copy (after the optimizer changed the host weights, or a load)."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # host sync: no copy may still read the host weights
        self.slots.clear()

    def memory_report(self) -> dict[str, int]:
        """Device bytes for expert state: fully resident (weights + grads + 2 AdamW moments) vs
        streamed (the peak of fetched weight copies; one layer's weight gradient is transient)."""
        shard = sum(b.shard_bytes for b in self.banks)
        per_layer = max((b.shard_bytes for b in self.banks), default=0)
        return {"expert_bytes_resident": 4 * shard, "expert_bytes_streamed_peak": self.stats["peak_device_bytes"],
                "expert_bytes_streamed_bound": 3 * per_layer, "host_expert_bytes": 4 * shard}


class HostExpertBank(nn.Module):
    """An ExpertBank whose two stacked tensors stay in host memory; same names, same math."""

    def __init__(self, bank: ExpertBank, index: int):
        super().__init__()
        if getattr(bank, "b13_EF2", None) is not None or getattr(bank, "act", None) not in (None, ExpertActivation()):
            raise ValueError("expert offload in training streams plain SwiGLU experts; this model's experts have "
                             "biases or a clamped SwiGLU (gpt-oss): train it without expert offload")
        self.num_experts, self.d_model, self.d_expert = bank.num_experts, bank.d_model, bank.d_expert
        self.expert_offset, self.index = bank.expert_offset, index
        pin = bank.w13_EDF2.is_cuda  # page-locked host memory: async copies at full PCIe speed
        self.w13_EDF2 = nn.Parameter(_to_host(bank.w13_EDF2, pin))
        self.w2_EFD = nn.Parameter(_to_host(bank.w2_EFD, pin))
        self.streamer: ExpertStreamer | None = None

    @property
    def shard_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.w13_EDF2, self.w2_EFD))

    def forward(self, x_sorted_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        return _StreamedExperts.apply(x_sorted_ND, counts_E, self.w13_EDF2, self.w2_EFD, self)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_expert={self.d_expert}, "
                f"expert_offset={self.expert_offset}, host")


def _to_host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    host = t.detach().to("cpu", copy=True)
    return host.pin_memory() if pin else host


class _StreamedExperts(torch.autograd.Function):
    """Grouped expert MLP on fetched weights; backward re-fetches and recomputes (nothing of the
    device weights is saved), and returns the weight gradients on the host."""

    @staticmethod
    def forward(ctx, x_ND, counts_E, w13_host, w2_host, bank: HostExpertBank):
        dtype = compute_dtype(x_ND)
        w13, w2 = bank.streamer.weights(bank.index, +1)
        ctx.save_for_backward(x_ND, counts_E)
        ctx.bank, ctx.dtype = bank, dtype
        return kernels.grouped_mlp(x_ND.to(dtype), w13.to(dtype), w2.to(dtype), counts_E)

    @staticmethod
    def backward(ctx, g_ND):
        x_ND, counts_E = ctx.saved_tensors
        bank, dtype = ctx.bank, ctx.dtype
        w13, w2 = bank.streamer.weights(bank.index, -1)
        with torch.enable_grad():
            x = x_ND.detach().requires_grad_(ctx.needs_input_grad[0])
            w13, w2 = w13.detach().requires_grad_(), w2.detach().requires_grad_()
            y = kernels.grouped_mlp(x.to(dtype), w13.to(dtype), w2.to(dtype), counts_E)
            inputs = (w13, w2, x) if ctx.needs_input_grad[0] else (w13, w2)
            grads = torch.autograd.grad(y, inputs, g_ND, allow_unused=True)
        g13, g2 = (g if g is not None else torch.zeros_like(w) for g, w in zip(grads[:2], (w13, w2)))
        gx = None
        if ctx.needs_input_grad[0]:
            gx = grads[2] if grads[2] is not None else torch.zeros_like(x_ND)
        # device -> host: the CPU optimizer steps these experts.
        return gx, None, g13.to(bank.w13_EDF2.device), g2.to(bank.w2_EFD.device), None


def enable_expert_offload(model: MoETransformer, device: torch.device) -> ExpertStreamer:
    """Replace every MoE layer's ExpertBank by a HostExpertBank sharing one streamer. Call after
    the model is on its device and before the optimizer is built."""
    banks = []
    for i, layer in enumerate(model.moe_layers()):
        host = HostExpertBank(layer.experts, i)
        layer.experts = host
        banks.append(host)
    streamer = ExpertStreamer(banks, device)
    for b in banks:
        b.streamer = streamer
    return streamer
