"""The MoE step with offloaded experts: a drop-in `experts` module and the runtime behind it.

Legend: N routed token rows sorted by expert, D model dim, E experts, S slots, m MoE layer index.

`CachedExperts` has ExpertBank's signature, forward(x_sorted_ND, counts_E) -> y_sorted_ND, so the
model's MoELayer (router, dispatcher, combine, shared experts) runs unchanged. The runtime decides
nothing itself: the Planner (offload/decision.py, shared with the simulator) turns a layer's
routed counts into a LayerPlan (copy / run-from-slot / run-on-host ops in execution order) and
the runtime executes it with the copy engine. Two paths per layer:
- resident: every expert of the layer holds its home slot (capacity >= all experts, after the
  first use of each): the layer's slots are contiguous, so it runs like ExpertBank, one kernel
  call, no host sync; its uses are counted on the device and read once per forward pass.
- planned: counts_E goes to the host once (host sync), the planner decides, the ops run.
Each expert runs as a group of one through kernels.grouped_mlp, the same kernel the resident
ExpertBank calls, over the same rows: on CPU the outputs match the resident model bit for bit.
Quantised experts (store.layout.quant) run through kernels.grouped_mlp_quant from their slots and
offload/quant_host.py on host cores, on their quantised bytes.
gpt-oss experts (biases on both matmuls, clamped SwiGLU; an ExpertExtra) keep their biases with
the dense weights (on the device, [E, 2F + D] a layer) and run every path in torch
(core.experts.expert_mlp math): from a slot, split, on the host (torch matmuls on the store's
weights, not the bf16 C kernel of cpu_experts.py), resident; quantised ones are dequantised one
expert at a time first.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from moe_runtime import kernels
from moe_runtime.core.experts import ExpertActivation, ExpertBank, expert_mlp
from moe_runtime.kernels.reference import swiglu

from moe_runtime.offload.cache import ExpertCache, Key, SlotPool, StaleSlotError
from moe_runtime.offload.cpu_experts import CostModel, expert_forward, host_expert_forward
from moe_runtime.offload.copy_engines import Ticket, split_row
from moe_runtime.offload.decision import LayerPlan, Planner, Tally
from moe_runtime.offload.quant_host import host_quant_expert_forward
from moe_runtime.offload.store import ExpertLayout, HostExpertStore

Counters = Tally
"""The engine's counters are the planner's tally (kept under the engine's old name)."""


class ExpertExtra(NamedTuple):
    """What a gpt-oss expert adds to plain SwiGLU: y = act(x W13 + b13[e]) W2 + b2[e]."""

    b13_EF2: torch.Tensor | None
    b2_ED: torch.Tensor | None
    act: ExpertActivation


class CachedExperts(nn.Module):
    """Stands in for one MoE layer's ExpertBank; its weights live in the store and the slot pool.
    bank: the ExpertBank it replaces; its biases (gpt-oss) are kept here as buffers (they move with
    the dense weights) and its activation is passed to the runtime."""

    def __init__(self, layout: ExpertLayout, moe_layer: int, bank: ExpertBank | None = None):
        super().__init__()
        self.moe_layer = moe_layer
        self.num_experts, self.d_model, self.d_expert = layout.num_experts, layout.d_model, layout.d_expert
        self._runtime: list[OffloadRuntime] = []  # a list, so nn.Module does not adopt it as a submodule
        biased = bank is not None and bank.b13_EF2 is not None
        self.act = bank.act if bank is not None else ExpertActivation()
        self.register_buffer("b13_EF2", bank.b13_EF2.detach().clone() if biased else None)
        self.register_buffer("b2_ED", bank.b2_ED.detach().clone() if biased else None)

    def bind(self, runtime: "OffloadRuntime") -> None:
        self._runtime[:] = [runtime]

    def extra(self) -> ExpertExtra | None:
        if self.b13_EF2 is None and self.act.kind == "swiglu":
            return None
        return ExpertExtra(self.b13_EF2, self.b2_ED, self.act)

    def forward(self, x_sorted_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if not self._runtime:
            raise RuntimeError("CachedExperts used before ExpertCacheEngine finished setting up (bind not called)")
        return self._runtime[0].run_experts(self.moe_layer, x_sorted_ND, counts_E, self.extra())

    def extra_repr(self) -> str:
        return f"moe_layer={self.moe_layer}, num_experts={self.num_experts} (offloaded)"


class OffloadRuntime:
    """Store + slot pool + copy engine, executing the Planner's decisions for each MoE layer."""

    def __init__(self, store: HostExpertStore, pool: SlotPool, cache: ExpertCache, copy_engine, cost: CostModel,
                 *, cpu_experts: bool, stream_fraction: float, max_inflight: int, profile=None):
        if not 0 < stream_fraction <= 1:
            raise ValueError(f"stream_fraction={stream_fraction} must be in (0, 1]")
        if max_inflight < 1:
            raise ValueError(f"max_inflight={max_inflight} must be >= 1")
        lay = store.layout
        self.store, self.pool, self.cache, self.copies, self.cost = store, pool, cache, copy_engine, cost
        self.cpu_experts = cpu_experts
        self.planner = Planner(cache, cost, lay.num_layers, scheme=cache.policy, cpu_experts=cpu_experts,
                               stream_fraction=stream_fraction, num_experts=lay.num_experts,
                               max_prefetch_per_layer=max_inflight, profile=profile)
        self.tickets: dict[Key, Ticket] = {}
        self.loaded: list[Key | None] = [None] * pool.num_slots
        """What each slot's last issued copy holds, as the ops run (the plan ran ahead of it)."""
        for op in self.planner.preload():  # every expert fits: load them all now, once
            self._issue(op)
        self.copies.synchronize()  # host sync: set-up only
        self.tickets.clear()
        self.resident = [self.planner.layer_resident(m) for m in range(lay.num_layers)]
        """Layer m's experts all sit in their home slots (when every expert fits: all layers)."""
        self._resident_counts: list[torch.Tensor] = []
        # Grow-only [0, 1, 2, ...] on the device and host: count_1 tensors are views, not allocations.
        self._counts_dev = torch.arange(1, device=pool.device)
        self._counts_host = torch.arange(1)

    def replan(self, scheme: str, *, profile, cpu_experts: bool) -> int:
        """Switch to a fresh Planner of `scheme` (policy="default" after its calibration window):
        primed with `profile`, it loads its warm / pinned set now, like a model's resident weights
        (every copy lands before the next step: host sync). The counters carry on. Returns the copies."""
        old = self.planner
        self.copies.synchronize()  # host sync: the old plan's copies land before the slots change hands
        self.tickets.clear()
        self.cache = ExpertCache(self.pool.num_slots, scheme)
        self.cpu_experts = cpu_experts
        lay = self.store.layout
        self.planner = Planner(self.cache, self.cost, lay.num_layers, scheme=scheme, cpu_experts=cpu_experts,
                               stream_fraction=old.stream_fraction, num_experts=lay.num_experts,
                               max_prefetch_per_layer=old.max_prefetch, profile=profile, split_s=old.split_s)
        self.planner.t, self.planner.decisions, self.planner.pred_stats = old.t, old.decisions, old.pred_stats
        q, oq = self.planner.queue, old.queue
        q.submitted, q.preempted, q.dropped = oq.submitted, oq.preempted, oq.dropped
        ops = self.planner.preload()
        for op in ops:
            self._issue(op)
        self.copies.synchronize()  # host sync: the switch, once per run
        self.tickets.clear()
        self.resident = [self.planner.layer_resident(m) for m in range(lay.num_layers)]
        return len(ops)

    # The engine and its report read these by their old names.
    @property
    def c(self) -> Tally:
        self._fold_resident()
        return self.planner.t

    @c.setter
    def c(self, value: Tally) -> None:
        self._resident_counts.clear()
        self.planner.t = value

    decisions = property(lambda self: self.planner.decisions, lambda self, v: setattr(self.planner, "decisions", v))
    queue = property(lambda self: self.planner.queue)
    pred_stats = property(lambda self: self.planner.pred_stats)
    prefetched = property(lambda self: self.planner.prefetched)
    pending_eval = property(lambda self: self.planner.pending_eval)

    @property
    def all_resident(self) -> bool:
        """Every expert of every layer is in its home slot: nothing left to predict or copy."""
        return all(self.resident)

    # ---------------------------------------------------------------- helpers
    def _count(self, n: int, host: bool = False) -> torch.Tensor:
        buf = self._counts_host if host else self._counts_dev
        if n >= buf.numel():
            size = 1 << n.bit_length()
            buf = torch.arange(size, device="cpu" if host else self.pool.device)
            if host:
                self._counts_host = buf
            else:
                self._counts_dev = buf
        return buf[n:n + 1]

    def _slot_weights(self, slot: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13_DF2, w2_FD) of a slot in `dtype` (a quantised slot dequantised: one expert)."""
        if self.pool.quant is not None:
            w13, w2 = self.pool.quant[slot].dequantize(dtype)
            return w13[0], w2[0]
        return self.pool.w13_SDF2[slot].to(dtype), self.pool.w2_SFD[slot].to(dtype)

    def _run_slot(self, key: Key, slot: int, x_ND: torch.Tensor, out_ND: torch.Tensor,
                  extra: ExpertExtra | None = None) -> None:
        if self.loaded[slot] != key:
            raise StaleSlotError(f"plan runs {key} from slot {slot}, whose last copy was {self.loaded[slot]}; "
                                 f"reading it would use the wrong expert's weights")
        t = self.tickets.pop(key, None)
        if t is not None:
            self.copies.wait(t)  # CUDA: the compute stream waits on this copy's event only
        count_1 = self._count(x_ND.shape[0])
        if extra is not None:
            dtype = _out_dtype(x_ND)
            y = _extra_forward(x_ND.to(dtype), *self._slot_weights(slot, dtype), key[1], extra)
        elif self.pool.quant is not None:
            y = kernels.grouped_mlp_quant(x_ND.to(_out_dtype(x_ND)), self.pool.quant[slot], count_1)
        else:
            y = expert_forward(x_ND, self.pool.w13_SDF2[slot], self.pool.w2_SFD[slot], count_1)
        out_ND.copy_(y)
        self.copies.mark_read(slot)

    def _run_split(self, key: Key, slot: int, host_share: float, x_ND: torch.Tensor, out_ND: torch.Tensor,
                   extra: ExpertExtra | None = None) -> None:
        """A split run: host cores compute x[:, :d] W13[:d] from the store while the device part
        (W13 rows d.. and W2) lands; the device adds x[:, d:] W13[d:], then SwiGLU and W2."""
        m, e = key
        if self.loaded[slot] != key:
            raise StaleSlotError(f"plan runs {key} split from slot {slot}, whose last copy was {self.loaded[slot]}")
        if self.pool.quant is not None:  # a quantised copy moved the whole expert (copy_engines._rows)
            self._run_slot(key, slot, x_ND, out_ND, extra)
            return
        d = split_row(host_share, self.store.layout.d_model)
        dtype = _out_dtype(x_ND)
        x = x_ND.to(dtype)
        # host sync (CUDA): the N activation rows' first d columns go to the host, like a host run
        h_host = x[:, :d].to("cpu") @ self.store.w13(m, e)[:d].to(dtype)
        h = h_host.to(x.device, non_blocking=True)
        t = self.tickets.pop(key, None)
        if t is not None:
            self.copies.wait(t)  # CUDA: the compute stream waits on the device part's event only
        h = torch.addmm(h, x[:, d:], self.pool.w13_SDF2[slot, d:].to(dtype))
        if extra is not None:
            out_ND.copy_(_extra_finish(h, self.pool.w2_SFD[slot].to(dtype), e, extra))
        else:
            out_ND.copy_(swiglu(h) @ self.pool.w2_SFD[slot].to(dtype))
        self.copies.mark_read(slot)

    def _run_host(self, key: Key, x_ND: torch.Tensor, out_ND: torch.Tensor, extra: ExpertExtra | None = None) -> None:
        m, e = key
        if extra is not None:  # torch on the host cores, on the store's weights (one expert dequantised)
            dtype = _out_dtype(x_ND)
            if self.store.layout.quant is not None:
                w13, w2 = (t[0] for t in self.store.quant_expert(m, e).dequantize(dtype))
            else:
                w13, w2 = self.store.w13(m, e).to(dtype), self.store.w2(m, e).to(dtype)
            x_host = x_ND.to("cpu", dtype)  # host sync (CUDA): the rows go to the host
            out_ND.copy_(_extra_forward(x_host, w13, w2, e, extra))
            return
        if self.store.layout.quant is not None:
            y = host_quant_expert_forward(x_ND, self.store.quant_expert(m, e))
        else:
            y = host_expert_forward(x_ND, self.store.w13(m, e), self.store.w2(m, e), self._count(x_ND.shape[0], True))
        out_ND.copy_(y)

    # ---------------------------------------------------------------- the MoE step
    def run_experts(self, m: int, x_ND: torch.Tensor, counts_E: torch.Tensor,
                    extra: ExpertExtra | None = None) -> torch.Tensor:
        """y_sorted_ND for MoE layer m: the resident path, or 1. which experts (host sync), 2. the
        planner's plan, 3. its ops in order. extra: gpt-oss biases and activation (None: SwiGLU)."""
        if self.resident[m]:
            return self._run_resident(m, x_ND, counts_E, extra)
        counts = counts_E.tolist()  # host sync: the planner must know the layer's experts
        starts, at = [], 0
        for n in counts:
            starts.append(at)
            at += n
        plan = self.planner.serve(m, {e: n for e, n in enumerate(counts) if n > 0})
        y_ND = torch.empty_like(x_ND, dtype=_out_dtype(x_ND))
        self.execute(plan, lambda e: (starts[e], starts[e] + counts[e]), x_ND, y_ND, extra)
        self.resident[m] = self.planner.layer_resident(m)
        return y_ND

    def _run_resident(self, m: int, x_ND: torch.Tensor, counts_E: torch.Tensor,
                      extra: ExpertExtra | None = None) -> torch.Tensor:
        """Layer m's experts are slots m*E .. m*E+E-1: one grouped call, exactly ExpertBank's."""
        E = counts_E.shape[0]
        lo = m * E
        dtype = _out_dtype(x_ND)
        if extra is not None and self.pool.quant is not None:
            y = self._run_resident_quant_extra(lo, x_ND.to(dtype), counts_E, extra)
        elif extra is not None:
            y = expert_mlp(x_ND.to(dtype), self.pool.w13_SDF2[lo:lo + E].to(dtype), self.pool.w2_SFD[lo:lo + E].to(dtype),
                           counts_E, extra.b13_EF2, extra.b2_ED, extra.act)
        elif self.pool.quant is not None:
            y = kernels.grouped_mlp_quant(x_ND.to(dtype), self.pool.quant[lo:lo + E], counts_E)
        else:
            y = kernels.grouped_mlp(x_ND.to(dtype), self.pool.w13_SDF2[lo:lo + E].to(dtype),
                                    self.pool.w2_SFD[lo:lo + E].to(dtype), counts_E)
        self._resident_counts.append(counts_E)  # counted when the tally is read: no work per layer
        if len(self._resident_counts) >= 4096 and not (x_ND.is_cuda and torch.cuda.is_current_stream_capturing()):
            self._fold_resident()  # (never while a CUDA graph is recorded: the fold reads on the host)
        return y

    def _run_resident_quant_extra(self, lo: int, x_ND: torch.Tensor, counts_E: torch.Tensor,
                                  extra: ExpertExtra) -> torch.Tensor:
        """gpt-oss experts in quantised slots: one expert dequantised at a time (never a whole layer)."""
        y = torch.empty_like(x_ND)
        at = 0
        for e, n in enumerate(counts_E.tolist()):  # host sync: the loop needs the counts
            if n:
                y[at:at + n] = _extra_forward(x_ND[at:at + n], *self._slot_weights(lo + e, x_ND.dtype), e, extra)
            at += n
        return y

    def _fold_resident(self) -> None:
        """Add the resident path's uses (all hits) to the tally."""
        if self._resident_counts:
            # host sync: when the counters are read (a report) or every 4096 layers, never per layer
            uses = int((torch.stack(self._resident_counts) > 0).sum())
            t = self.planner.t
            t.expert_uses += uses
            t.hits += uses
            t.cache_steps += len(self._resident_counts)
            self._resident_counts.clear()

    def execute(self, plan: LayerPlan, rows, x_ND: torch.Tensor, y_ND: torch.Tensor,
                extra: ExpertExtra | None = None) -> None:
        """Run a plan's ops in order: copies go to the copy engine, runs wait only on their own copy."""
        for op in plan.ops:
            if op.kind in ("copy", "fill"):
                self._issue(op)
                continue
            a, b = rows(op.key[1])
            if op.kind == "run":
                self._run_slot(op.key, op.slot, x_ND[a:b], y_ND[a:b], extra)
            elif op.kind == "split":
                self._run_split(op.key, op.slot, op.host_share, x_ND[a:b], y_ND[a:b], extra)
            else:
                self._run_host(op.key, x_ND[a:b], y_ND[a:b], extra)

    def _issue(self, op) -> None:
        """A copy (whole, or a split run's device part) or a split run's fill; the key's next run
        waits on the newest."""
        if op.evicted is not None:
            self.tickets.pop(op.evicted, None)
        if op.kind == "copy":
            self.loaded[op.slot] = op.key
        self.tickets[op.key] = self.copies.issue(op.key, op.slot, op.host_share, op.kind == "fill")

    # ---------------------------------------------------------------- prefetch
    def begin_layer(self, m: int, predictions=()) -> None:
        """Before layer m's attention: the planner takes the predictions and issues what pays."""
        if self.resident[m]:
            return
        for op in self.planner.prefetch(m, predictions):
            self._issue(op)
        self.copies.progress()  # host engine: one queued copy runs; CUDA: a non-blocking query

    def end_pass(self) -> None:
        """A forward pass ended: predictions never go past it."""
        for op in self.planner.end_pass():  # a hot-set peer pins its calibration prefix's experts
            self._issue(op)
        self.copies.settle()
        self.copies.collect_stall()


def _extra_finish(h_NF2: torch.Tensor, w2_FD: torch.Tensor, e: int, extra: ExpertExtra) -> torch.Tensor:
    """act(h + b13[e]) W2 + b2[e] on h's device (biases brought there: a few hundred values)."""
    if extra.b13_EF2 is not None:
        h_NF2 = h_NF2 + extra.b13_EF2[e].to(h_NF2.device, h_NF2.dtype)
    y = extra.act(h_NF2) @ w2_FD
    if extra.b2_ED is not None:
        y = y + extra.b2_ED[e].to(y.device, y.dtype)
    return y


def _extra_forward(x_ND: torch.Tensor, w13_DF2: torch.Tensor, w2_FD: torch.Tensor, e: int,
                   extra: ExpertExtra) -> torch.Tensor:
    """One gpt-oss expert: act(x W13 + b13[e]) W2 + b2[e], the math of core.experts.expert_mlp."""
    return _extra_finish(x_ND @ w13_DF2, w2_FD, e, extra)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    from moe_runtime.core.experts import compute_dtype
    return compute_dtype(x)


__all__ = ["CachedExperts", "OffloadRuntime", "Counters", "ExpertExtra"]
