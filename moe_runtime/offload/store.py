"""Host expert store: every routed expert of every MoE layer in ONE host buffer, allocated once.

Legend: L MoE layers, E experts per layer, D model dim, F expert hidden dim.

The buffer is pinned (page-locked) when CUDA is available, because host->device copies from
pageable memory run at a fraction of the link bandwidth and cannot overlap compute. It holds two
regions, w13 [L, E, D, 2F] then w2 [L, E, F, D], so that expert (l, e) is two contiguous chunks
(one DMA each) and a range of experts of one layer is a contiguous view of either region.
Dense weights (attention, norms, routers, shared experts, embeddings) stay on the device.
Layers are addressed by their MoE-layer index l (0 .. L-1), not their block index.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from moe_runtime.core.experts import ExpertBank


@dataclass(frozen=True)
class ExpertLayout:
    """Shapes and dtype shared by every routed expert of a model."""

    num_layers: int
    """L: MoE layers."""
    num_experts: int
    """E: routed experts per MoE layer."""
    d_model: int
    """D."""
    d_expert: int
    """F."""
    dtype: torch.dtype

    @property
    def w13_numel(self) -> int:
        return self.d_model * 2 * self.d_expert

    @property
    def w2_numel(self) -> int:
        return self.d_expert * self.d_model

    @property
    def expert_numel(self) -> int:
        return self.w13_numel + self.w2_numel

    @property
    def expert_bytes(self) -> int:
        return self.expert_numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def total_bytes(self) -> int:
        return self.total_experts * self.expert_bytes


def split_views(flat: torch.Tensor, n: int, layout: ExpertLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [n, D, 2F] and w2 [n, F, D] views of a flat buffer holding n experts (two regions)."""
    D, F = layout.d_model, layout.d_expert
    w13 = flat[: n * layout.w13_numel].view(n, D, 2 * F)
    w2 = flat[n * layout.w13_numel: n * layout.expert_numel].view(n, F, D)
    return w13, w2


class HostExpertStore:
    """All experts' weights in one host buffer; `w13(l, e)` / `w2(l, e)` are views, never copies."""

    def __init__(self, layout: ExpertLayout, *, pin: bool | None = None):
        self.layout = layout
        self.pinned = torch.cuda.is_available() if pin is None else pin
        if self.pinned and not torch.cuda.is_available():
            raise ValueError("pin=True needs CUDA (page-locked memory is registered with the driver); "
                             "use pin=None or pin=False on a machine without a GPU")
        # The only allocation the store ever makes: one buffer for every expert of every layer.
        self.buffer = torch.empty(layout.total_experts * layout.expert_numel, dtype=layout.dtype)
        self.pinned_via = _pin_exactly(self) if self.pinned else "not pinned"
        w13, w2 = split_views(self.buffer, layout.total_experts, layout)
        L, E = layout.num_layers, layout.num_experts
        self.w13_LEDF2 = w13.view(L, E, layout.d_model, 2 * layout.d_expert)
        self.w2_LEFD = w2.view(L, E, layout.d_expert, layout.d_model)

    @classmethod
    def from_banks(cls, banks: list[ExpertBank], *, pin: bool | None = None) -> "HostExpertStore":
        """Copy the weights of one ExpertBank per MoE layer (in layer order) into a new store."""
        if not banks:
            raise ValueError("the model has no MoE layers (first_dense_layers == n_layers); "
                             "there are no experts to offload")
        b0 = banks[0]
        layout = ExpertLayout(num_layers=len(banks), num_experts=b0.num_experts, d_model=b0.d_model,
                              d_expert=b0.d_expert, dtype=b0.w13_EDF2.dtype)
        store = cls(layout, pin=pin)
        with torch.no_grad():
            for layer, bank in enumerate(banks):
                store.load_layer(layer, bank.w13_EDF2, bank.w2_EFD)
        return store

    def load_layer(self, layer: int, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor) -> None:
        """Write one layer's stacked weights (any device; copied to host)."""
        want13, want2 = tuple(self.w13_LEDF2.shape[1:]), tuple(self.w2_LEFD.shape[1:])
        if tuple(w13_EDF2.shape) != want13 or tuple(w2_EFD.shape) != want2:
            raise ValueError(f"layer {layer}: expert weights of shapes {tuple(w13_EDF2.shape)} / "
                             f"{tuple(w2_EFD.shape)} do not match the store's {want13} / {want2}; every "
                             f"MoE layer must have the same num_experts, d_model and d_expert")
        self.w13_LEDF2[layer].copy_(w13_EDF2.detach())
        self.w2_LEFD[layer].copy_(w2_EFD.detach())

    def w13(self, layer: int, expert: int) -> torch.Tensor:
        """[D, 2F] view of expert (layer, expert): [gate | up]."""
        return self.w13_LEDF2[layer, expert]

    def w2(self, layer: int, expert: int) -> torch.Tensor:
        """[F, D] view of expert (layer, expert): down projection."""
        return self.w2_LEFD[layer, expert]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def report(self) -> dict[str, Any]:
        """Size accounting, JSON-able."""
        lay = self.layout
        return {"layers": lay.num_layers, "experts_per_layer": lay.num_experts, "d_model": lay.d_model,
                "d_expert": lay.d_expert, "dtype": str(lay.dtype).removeprefix("torch."),
                "expert_bytes": lay.expert_bytes, "total_bytes": self.nbytes,
                "total_gib": self.nbytes / 2**30, "pinned": self.pinned, "pinned_via": self.pinned_via}

    def storage_ptrs(self) -> tuple[int, int]:
        """(data pointer, bytes) of the one buffer: constant for the store's lifetime."""
        return self.buffer.data_ptr(), self.nbytes


def _pin_exactly(store: HostExpertStore) -> str:
    """Page-lock exactly the store's bytes with cudaHostRegister. (torch's caching host allocator
    would round a pinned allocation up to a power of two: an 11.3 GB store would pin 16 GB.)
    Falls back to that allocator if registration is refused (e.g. a low memlock limit)."""
    cudart = torch.cuda.cudart()
    ptr, size = store.buffer.data_ptr(), store.buffer.numel() * store.buffer.element_size()
    if int(cudart.cudaHostRegister(ptr, size, 0)) == 0:
        weakref.finalize(store, cudart.cudaHostUnregister, ptr)
        return "cudaHostRegister (exact size)"
    store.buffer = store.buffer.pin_memory()
    return "torch pinned allocator (rounded up to a power of two)"


__all__ = ["ExpertLayout", "HostExpertStore", "split_views"]
