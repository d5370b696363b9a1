"""The MoE step with offloaded experts: a drop-in `experts` module and the runtime behind it.

Legend: N routed token rows sorted by expert, D model dim, E experts, S slots, m MoE layer index.

`CachedExperts` has ExpertBank's signature, forward(x_sorted_ND, counts_E) -> y_sorted_ND, so the
model's MoELayer (router, dispatcher, combine, shared experts) runs unchanged. Per step the
runtime picks a regime from the routed counts:
- cache: hits run from their slots (waiting only on their own copy events); each miss is copied
  on demand or, with cpu_experts, run on host cores when the calibrated cost model says so.
  Misses are pipelined through the slots, so a capacity below one layer's experts still progresses.
- stream: when nearly every expert of the layer is used (prefill, large batches) and copying
  beats host compute at that many tokens per expert, every miss streams in expert order, double
  buffered (up to half the pool in flight while the other half computes), no per-expert decisions.
Each expert runs as a group of one through kernels.grouped_mlp, the same kernel the resident
ExpertBank calls, over the same rows: on CPU the outputs match the resident model bit for bit.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from offload.cache import ExpertCache, Key, SlotPool
from offload.cpu_experts import CostModel, expert_forward, host_expert_forward
from offload.predictor import PredictionStats
from offload.prefetch import PrefetchQueue, RecencyGuard, Ticket
from offload.store import ExpertLayout, HostExpertStore


@dataclass
class Counters:
    expert_uses: int = 0
    hits: int = 0
    late_hits: int = 0
    misses: int = 0
    cpu_served: int = 0
    demand_copies: int = 0
    stream_copies: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    background_copies: int = 0
    cache_steps: int = 0
    stream_steps: int = 0

    def minus(self, other: "Counters") -> "Counters":
        return Counters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int | float | None]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["hit_rate"] = self.hits / self.expert_uses if self.expert_uses else None
        return d


class CachedExperts(nn.Module):
    """Stands in for one MoE layer's ExpertBank; its weights live in the store and the slot pool."""

    def __init__(self, layout: ExpertLayout, moe_layer: int):
        super().__init__()
        self.moe_layer = moe_layer
        self.num_experts, self.d_model, self.d_expert = layout.num_experts, layout.d_model, layout.d_expert
        self._runtime: list[OffloadRuntime] = []  # a list, so nn.Module does not adopt it as a submodule

    def bind(self, runtime: "OffloadRuntime") -> None:
        self._runtime[:] = [runtime]

    def forward(self, x_sorted_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if not self._runtime:
            raise RuntimeError("CachedExperts used before ExpertCacheEngine finished setting up (bind not called)")
        return self._runtime[0].run_experts(self.moe_layer, x_sorted_ND, counts_E)

    def extra_repr(self) -> str:
        return f"moe_layer={self.moe_layer}, num_experts={self.num_experts} (offloaded)"


class OffloadRuntime:
    """Store + slot cache + copy engine + cost model + prefetch queue, and the per-layer MoE step."""

    def __init__(self, store: HostExpertStore, pool: SlotPool, cache: ExpertCache, copy_engine, cost: CostModel,
                 *, cpu_experts: bool, stream_fraction: float, max_inflight: int):
        if not 0 < stream_fraction <= 1:
            raise ValueError(f"stream_fraction={stream_fraction} must be in (0, 1]")
        if max_inflight < 1:
            raise ValueError(f"max_inflight={max_inflight} must be >= 1")
        self.store, self.pool, self.cache, self.copies, self.cost = store, pool, cache, copy_engine, cost
        self.cpu_experts, self.stream_fraction, self.max_inflight = cpu_experts, stream_fraction, max_inflight
        self.queue = PrefetchQueue(max_pending=store.layout.total_experts)
        self.tickets: dict[Key, Ticket] = {}
        self.prefetched: set[Key] = set()
        self.c = Counters()
        self.decisions = {"wait": 0, "copy": 0, "cpu": 0}
        self.pred_stats = PredictionStats()
        self.pending_eval: dict[int, list[tuple[int, set[int]]]] = {}
        self.guard = RecencyGuard()
        # Grow-only [0, 1, 2, ...] on the device and host: count_1 tensors are views, not allocations.
        self._counts_dev = torch.arange(1, device=pool.device)
        self._counts_host = torch.arange(1)

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

    def _assign(self, key: Key, slot: int) -> None:
        old = self.cache.assign(key, slot)
        if old is not None:
            self.tickets.pop(old, None)
            if old in self.prefetched:
                self.prefetched.discard(old)
                self.c.prefetch_wasted += 1

    def _run_slot(self, key: Key, x_ND: torch.Tensor, out_ND: torch.Tensor) -> None:
        slot = self.cache.check_handle(self.cache.handle(key))
        out_ND.copy_(expert_forward(x_ND, self.pool.w13_SDF2[slot], self.pool.w2_SFD[slot], self._count(x_ND.shape[0])))
        self.copies.mark_read(slot)
        self.cache.access(key)
        self.tickets.pop(key, None)
        if key in self.prefetched:
            self.prefetched.discard(key)
            self.c.prefetch_used += 1

    def _run_host(self, key: Key, x_ND: torch.Tensor, out_ND: torch.Tensor) -> None:
        m, e = key
        y = host_expert_forward(x_ND, self.store.w13(m, e), self.store.w2(m, e), self._count(x_ND.shape[0], True))
        out_ND.copy_(y)
        self.c.cpu_served += 1

    # ---------------------------------------------------------------- the MoE step
    def run_experts(self, m: int, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """y_sorted_ND for MoE layer m: 1. which experts (host sync), 2. score predictions, 3. regime,
        4. serve hits then misses, 5. let queued prefetches proceed."""
        counts = counts_E.tolist()  # host sync: the experts to serve must be known on the host
        needed = [e for e, n in enumerate(counts) if n > 0]
        starts = [0] * len(counts)
        for e in range(1, len(counts)):
            starts[e] = starts[e - 1] + counts[e - 1]
        rows = {e: (starts[e], starts[e] + counts[e]) for e in needed}
        self._score_predictions(m, needed)
        self.queue.layer_done(m)
        y_ND = torch.empty_like(x_ND, dtype=_out_dtype(x_ND))
        hits = [e for e in needed if (m, e) in self.cache]
        misses = [e for e in needed if (m, e) not in self.cache]
        self.c.expert_uses += len(needed)
        self.c.hits += len(hits)
        self.c.misses += len(misses)
        stream = len(needed) >= self.stream_fraction * len(counts) and len(needed) > 1 and (
            not self.cpu_experts or self.cost.prefers_copy(sum(counts) // max(1, len(needed))))
        self._serve_hits(m, hits, x_ND, y_ND, rows, allow_cpu=self.cpu_experts and not stream)
        if stream:
            self.c.stream_steps += 1
            self._stream(m, misses, x_ND, y_ND, rows)
        else:
            self.c.cache_steps += 1
            copy = []
            for e in misses:
                a, b = rows[e]
                dec = self.cost.decide(b - a, None, self.cpu_experts)
                self.decisions[dec] += 1
                if dec == "cpu":
                    self._run_host((m, e), x_ND[a:b], y_ND[a:b])
                    self._admit_in_background((m, e))
                else:
                    copy.append(e)
            self.c.demand_copies += len(copy)
            self._fetch_and_run(m, copy, x_ND, y_ND, rows)
        self.pump()
        return y_ND

    def _serve_hits(self, m, hits, x_ND, y_ND, rows, allow_cpu: bool) -> None:
        def landed(e: int) -> bool:
            return (m, e) not in self.tickets or self.copies.ready(self.tickets[(m, e)])

        for e in sorted(hits, key=lambda e: not landed(e)):  # landed copies first, in-flight ones last
            key, (a, b) = (m, e), rows[e]
            t = self.tickets.get(key)
            if t is not None and not self.copies.ready(t):
                dec = self.cost.decide(b - a, self.copies.remaining(t), allow_cpu)
                self.decisions[dec] += 1
                if dec == "cpu":  # the copy keeps landing; the next use is a plain hit
                    self._run_host(key, x_ND[a:b], y_ND[a:b])
                    continue
                self.copies.wait(t)
                self.c.late_hits += 1
            self._run_slot(key, x_ND[a:b], y_ND[a:b])

    def _fetch_and_run(self, m, experts, x_ND, y_ND, rows, window: int | None = None) -> None:
        """Misses, pipelined: keep up to `window` copies ahead (all that unpinned slots allow when
        None), run them in order, and reuse each slot once its expert has run. Victims come from
        the policy (pinned slots are never offered), so a single slot still makes progress."""
        todo, issued = deque(experts), deque()
        while todo or issued:
            while todo and (window is None or len(issued) < window):
                slot = self.cache.choose_slot(self.queue.predicted, force=True)
                if slot is None:
                    break  # every slot holds a miss of this step that has not run yet
                key = (m, todo.popleft())
                self._assign(key, slot)
                self.cache.pin(slot)
                self.tickets[key] = self.copies.issue(key, slot)
                issued.append((key, slot))
            key, slot = issued.popleft()
            self.copies.wait(self.tickets[key])
            a, b = rows[key[1]]
            self.cache.unpin(slot)
            self._run_slot(key, x_ND[a:b], y_ND[a:b])

    def _stream(self, m, misses, x_ND, y_ND, rows) -> None:
        """Whole-layer streaming, double buffered: every miss copies in expert order with up to half
        the pool on the copy stream ahead of the expert computing from the other half."""
        self.c.stream_copies += len(misses)
        self._fetch_and_run(m, misses, x_ND, y_ND, rows, window=max(1, self.pool.num_slots // 2))

    def _admit_in_background(self, key: Key) -> None:
        """Copy a host-served expert into a slot only when no prefetch waits and the copy engine
        is idle, so it never delays a prefetch; never evicts a predicted expert."""
        if self.queue.pending or self.copies.num_inflight() or key in self.cache:
            return
        slot = self.cache.choose_slot(self.queue.predicted, force=False)
        if slot is None:
            return
        self._assign(key, slot)
        self.tickets[key] = self.copies.issue(key, slot)
        self.c.background_copies += 1

    # ---------------------------------------------------------------- prefetch
    def submit(self, predictions) -> None:
        for j, d, experts in predictions:
            self.queue.submit(j, experts, d)
            self.pending_eval.setdefault(j, []).append((d, set(experts)))

    def pump(self) -> None:
        """Issue queued prefetches, nearest deadline first, up to max_inflight copies in flight."""
        protected = self.guard.protect(self.queue.predicted, self.cache.num_slots)
        while True:
            if self.copies.num_inflight() >= self.max_inflight:
                self.copies.progress()  # host engine: one copy runs; CUDA: a non-blocking query
                if self.copies.num_inflight() >= self.max_inflight:
                    return
            req = self.queue.pop()
            if req is None:
                return
            if req.key in self.cache:
                continue
            slot = self.cache.choose_slot(protected, force=False)
            if slot is None:
                self.queue.push_back(req)
                return
            self._assign(req.key, slot)
            self.tickets[req.key] = self.copies.issue(req.key, slot)
            self.prefetched.add(req.key)
            self.c.prefetch_issued += 1

    def _score_predictions(self, m: int, needed: list[int]) -> None:
        scored = self.pending_eval.pop(m, [])
        for d, predicted in scored:
            self.pred_stats.update(m, d, predicted, needed)
        self.guard.observe(m, set(needed), [p for _, p in scored])

    def end_pass(self) -> None:
        """A forward pass ended: predictions never go past it."""
        self.queue.reset()
        self.pending_eval.clear()
        self.copies.settle()
        self.copies.collect_stall()


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    from moe.experts import compute_dtype
    return compute_dtype(x)


__all__ = ["CachedExperts", "OffloadRuntime", "Counters"]
