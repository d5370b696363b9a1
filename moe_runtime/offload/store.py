"""Host expert store: every routed expert of every MoE layer in ONE host buffer, allocated once.

Legend: L MoE layers, E experts per layer, D model dim, F expert hidden dim.

The buffer is pinned (page-locked) when CUDA is available, because host->device copies from
pageable memory run at a fraction of the link bandwidth and cannot overlap compute. It holds two
regions, w13 [L, E, D, 2F] then w2 [L, E, F, D], so that expert (l, e) is two contiguous chunks
(one DMA each) and a range of experts of one layer is a contiguous view of either region.
Dense weights (attention, norms, routers, shared experts, embeddings) stay on the device.
Layers are addressed by their MoE-layer index l (0 .. L-1), not their block index.

Quantised experts (layout.quant = int8 | int4 | mxfp4, formats in kernels/quant.py): the buffer
is uint8 and holds one region per quantised field ([L*E, ...] each), so expert (l, e) is a few
contiguous chunks (one DMA each) of its quantised bytes and a layer's experts are contiguous views
of every region; `quant_expert(l, e)` / `quant_bank` are views, never copies.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch

from moe_runtime.core.experts import ExpertBank
from moe_runtime.kernels import quant as kq


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
    """The float dtype of the experts (of the store itself when not quantised; the rows' otherwise)."""
    quant: str | None = None
    """None (float experts as they are) or a quantised format: int8 | int4 | mxfp4."""
    group: int = 0
    """Quantisation group along K (kernels/quant.py's DEFAULT_GROUP when quantised)."""

    def __post_init__(self) -> None:
        if self.quant is not None:
            object.__setattr__(self, "group", kq.check_format(self.quant, self.group or None))

    @property
    def expert_dtype(self) -> str:
        """The --expert-dtype this layout stores: bf16 (unquantised) or the format."""
        return self.quant or "bf16"

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
        """Bytes of one expert as stored, copied and held in a slot (quantised bytes when quantised)."""
        if self.quant is not None:
            return kq.expert_bytes(self.d_model, self.d_expert, self.quant, self.group)
        return self.expert_numel * torch.empty((), dtype=self.dtype).element_size()

    def buffer_nbytes(self, n: int) -> int:
        """Bytes of a flat buffer of n experts (quantised regions are 16-byte aligned)."""
        if self.quant is not None:
            return kq.bank_nbytes(n, self.d_model, self.d_expert, self.quant, self.group)
        return n * self.expert_bytes

    @property
    def total_experts(self) -> int:
        return self.num_layers * self.num_experts

    @property
    def total_bytes(self) -> int:
        return self.total_experts * self.expert_bytes


def quant_views(flat_u8: torch.Tensor, n: int, layout: ExpertLayout) -> kq.QuantExperts:
    """A QuantExperts bank of n experts over a flat uint8 buffer (kernels/quant.py's region layout)."""
    return kq.bank_views(flat_u8, n, layout.d_model, layout.d_expert, layout.quant, layout.group)


def alloc_buffer(n: int, layout: ExpertLayout, device=None) -> torch.Tensor:
    """The one flat buffer of n experts: float values, or uint8 quantised bytes."""
    if layout.quant is not None:
        return torch.empty(layout.buffer_nbytes(n), dtype=torch.uint8, device=device)
    return torch.empty(n * layout.expert_numel, dtype=layout.dtype, device=device)


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
        self.buffer = alloc_buffer(layout.total_experts, layout)
        self.pinned_via = _pin_exactly(self) if self.pinned else "not pinned"
        L, E = layout.num_layers, layout.num_experts
        self.quant_bank: kq.QuantExperts | None = None
        """Quantised stores: every expert, index l * E + e (views of the buffer)."""
        if layout.quant is not None:
            self.quant_bank = quant_views(self.buffer, layout.total_experts, layout)
            return
        w13, w2 = split_views(self.buffer, layout.total_experts, layout)
        self.w13_LEDF2 = w13.view(L, E, layout.d_model, 2 * layout.d_expert)
        self.w2_LEFD = w2.view(L, E, layout.d_expert, layout.d_model)

    @classmethod
    def from_banks(cls, banks: list[ExpertBank], *, pin: bool | None = None, expert_dtype: str = "bf16",
                   group: int | None = None) -> "HostExpertStore":
        """Copy the weights of one ExpertBank per MoE layer (in layer order) into a new store,
        quantised to `expert_dtype` (bf16: kept as they are)."""
        if not banks:
            raise ValueError("the model has no MoE layers (first_dense_layers == n_layers); "
                             "there are no experts to offload")
        b0 = banks[0]
        layout = ExpertLayout(num_layers=len(banks), num_experts=b0.num_experts, d_model=b0.d_model,
                              d_expert=b0.d_expert, dtype=b0.w13_EDF2.dtype,
                              quant=None if expert_dtype == "bf16" else expert_dtype, group=group or 0)
        store = cls(layout, pin=pin)
        with torch.no_grad():
            for layer, bank in enumerate(banks):
                store.load_layer(layer, bank.w13_EDF2, bank.w2_EFD)
        return store

    def load_layer(self, layer: int, w13_EDF2: torch.Tensor, w2_EFD: torch.Tensor) -> None:
        """Write one layer's stacked weights (any device; copied to host)."""
        lay = self.layout
        E, D, F = lay.num_experts, lay.d_model, lay.d_expert
        want13, want2 = (E, D, 2 * F), (E, F, D)
        if tuple(w13_EDF2.shape) != want13 or tuple(w2_EFD.shape) != want2:
            raise ValueError(f"layer {layer}: expert weights of shapes {tuple(w13_EDF2.shape)} / "
                             f"{tuple(w2_EFD.shape)} do not match the store's {want13} / {want2}; every "
                             f"MoE layer must have the same num_experts, d_model and d_expert")
        if lay.quant is not None:  # quantised on load, one layer at a time
            self.load_layer_quant(layer, kq.quantize_experts(w13_EDF2.detach().cpu(), w2_EFD.detach().cpu(),
                                                             lay.quant, lay.group))
            return
        self.w13_LEDF2[layer].copy_(w13_EDF2.detach())
        self.w2_LEFD[layer].copy_(w2_EFD.detach())

    def load_layer_quant(self, layer: int, experts: kq.QuantExperts) -> None:
        """Write one layer's already quantised experts (same format and group as the store)."""
        lay = self.layout
        if lay.quant is None:
            raise ValueError("this store keeps float experts; build it with a quantised layout to load quantised ones")
        if (experts.fmt, experts.w13.group, experts.n, experts.w13.K, experts.w2.K) != \
                (lay.quant, lay.group, lay.num_experts, lay.d_model, lay.d_expert):
            raise ValueError(f"layer {layer}: quantised experts ({experts.fmt}, group {experts.w13.group}, "
                             f"{experts.n} experts, D={experts.w13.K}, F={experts.w2.K}) do not match the store's "
                             f"({lay.quant}, group {lay.group}, {lay.num_experts}, D={lay.d_model}, F={lay.d_expert})")
        E = lay.num_experts
        self.quant_bank[layer * E:(layer + 1) * E].copy_(experts)

    def quant_layer(self, layer: int) -> kq.QuantExperts:
        """Views of one layer's E quantised experts."""
        E = self.layout.num_experts
        return self.quant_bank[layer * E:(layer + 1) * E]

    def quant_expert(self, layer: int, expert: int) -> kq.QuantExperts:
        """Views of one quantised expert (a bank of one)."""
        return self.quant_bank[layer * self.layout.num_experts + expert]

    def _float_only(self, what: str) -> None:
        if self.layout.quant is not None:
            raise ValueError(f"store.{what} reads float experts, but this store holds {self.layout.quant} experts; "
                             f"use store.quant_expert(layer, expert)")

    def w13(self, layer: int, expert: int) -> torch.Tensor:
        """[D, 2F] view of expert (layer, expert): [gate | up]."""
        self._float_only("w13")
        return self.w13_LEDF2[layer, expert]

    def w2(self, layer: int, expert: int) -> torch.Tensor:
        """[F, D] view of expert (layer, expert): down projection."""
        self._float_only("w2")
        return self.w2_LEFD[layer, expert]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def report(self) -> dict[str, Any]:
        """Size accounting, JSON-able."""
        lay = self.layout
        return {"layers": lay.num_layers, "experts_per_layer": lay.num_experts, "d_model": lay.d_model,
                "d_expert": lay.d_expert, "dtype": str(lay.dtype).removeprefix("torch."),
                "expert_dtype": lay.expert_dtype, "group": lay.group,
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


__all__ = ["ExpertLayout", "HostExpertStore", "split_views", "quant_views", "alloc_buffer"]
