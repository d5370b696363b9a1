"""Prefetch requests and the copy engine that moves experts from the host store into device slots.

Legend: S slots. A key is (MoE layer index, expert id); a deadline is the MoE layer that needs it.

Two copy engines share one API (issue / ready / remaining / wait / progress / mark_read):
- CudaCopyEngine: copies on a dedicated stream from pinned memory, one `copy_done` event and one
  `slot_free` event per slot, both created once. The compute stream waits only on the events of
  the experts it uses; the copy stream waits on `slot_free` before overwriting a slot a queued
  kernel may still read. No host<->device sync except where commented.
- HostCopyEngine: the host is the "device". Copies are queued like work on a stream and executed
  in order when waited on or when `progress()` lets the "stream" advance, so in-flight, waiting
  and eviction-while-loading paths run (and are tested) on a machine without a GPU.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from offload.cache import Key, SlotPool
from offload.store import HostExpertStore


@dataclass
class PrefetchRequest:
    key: Key
    deadline: int
    """The MoE layer (this forward pass) that will use the expert: nearest first."""
    confidence: float
    """Predictor's probability for the expert (1.0 when exact)."""
    distance: int
    """Layers between where the prediction was made and the deadline."""


class PrefetchQueue:
    """Queued (not yet issued) prefetches plus the set of experts predicted for coming layers.

    A later prediction for a layer (made closer to it, hence more certain) replaces the layer's
    earlier one: its queued requests that the new prediction drops are pre-empted. Requests leave
    in deadline order (nearest layer first), the most confident first within a layer.
    """

    def __init__(self, max_pending: int):
        self.max_pending = max_pending
        self.pending: dict[Key, PrefetchRequest] = {}
        self.predicted: dict[Key, int] = {}
        self.distance_of_layer: dict[int, int] = {}
        self.submitted = self.preempted = self.dropped = 0

    def submit(self, layer: int, experts: dict[int, float], distance: int) -> None:
        if self.distance_of_layer.get(layer, distance + 1) < distance:
            return  # a nearer (more certain) prediction for this layer already stands
        self.distance_of_layer[layer] = distance
        for key in [k for k in self.pending if k[0] == layer and k[1] not in experts]:
            del self.pending[key]
            self.preempted += 1
        for key in [k for k in self.predicted if k[0] == layer and k[1] not in experts]:
            del self.predicted[key]
        for e, conf in experts.items():
            key = (layer, e)
            self.predicted[key] = layer
            self.pending[key] = PrefetchRequest(key, layer, float(conf), distance)
            self.submitted += 1
        while len(self.pending) > self.max_pending:
            worst = max(self.pending.values(), key=lambda r: (r.deadline, -r.confidence))
            del self.pending[worst.key]
            self.dropped += 1

    def pop(self) -> PrefetchRequest | None:
        if not self.pending:
            return None
        best = min(self.pending.values(), key=lambda r: (r.deadline, -r.confidence))
        return self.pending.pop(best.key)

    def push_back(self, req: PrefetchRequest) -> None:
        """Return a request that could not be issued yet (no evictable slot)."""
        self.pending[req.key] = req

    def layer_done(self, layer: int) -> None:
        """Layer `layer` ran: its predictions no longer protect anything, its requests are moot."""
        for d in (self.pending, self.predicted):
            for key in [k for k in d if k[0] <= layer]:
                del d[key]
        for l in [l for l in self.distance_of_layer if l <= layer]:
            del self.distance_of_layer[l]

    def reset(self) -> None:
        self.pending.clear()
        self.predicted.clear()
        self.distance_of_layer.clear()


@dataclass
class Ticket:
    key: Key
    slot: int
    seq: int
    eta: float
    """perf_counter time the copy is expected to finish (queue-aware estimate)."""
    done: bool = False


class _CopyEngineBase:
    def __init__(self, store: HostExpertStore, pool: SlotPool):
        self.store, self.pool = store, pool
        self.copy_s = 0.0
        """Estimated seconds per expert copy (set from the calibrated cost model)."""
        self.seq = 0
        self.last_eta = 0.0
        self.bytes_moved = 0
        self.copies = 0
        self.stall_s = 0.0
        self.inflight: deque[Ticket] = deque()

    def _ticket(self, key: Key, slot: int) -> Ticket:
        now = time.perf_counter()
        self.last_eta = max(now, self.last_eta) + self.copy_s
        self.seq += 1
        self.copies += 1
        self.bytes_moved += self.store.layout.expert_bytes
        return Ticket(key, slot, self.seq, self.last_eta)

    def remaining(self, t: Ticket) -> float:
        """Estimated seconds until t's copy lands (0 when known done)."""
        return 0.0 if self.ready(t) else max(0.0, t.eta - time.perf_counter())

    def num_inflight(self) -> int:
        """Copies issued and not known to have landed (a query, never a wait)."""
        while self.inflight and self.ready(self.inflight[0]):
            self.inflight.popleft()
        return len(self.inflight)


class HostCopyEngine(_CopyEngineBase):
    """Synchronous engine for the host-as-device mode; same semantics as a stream, in order."""

    def issue(self, key: Key, slot: int) -> Ticket:
        t = self._ticket(key, slot)
        self.inflight.append(t)
        return t

    def _run_oldest(self) -> None:
        t = self.inflight.popleft()
        layer, expert = t.key
        self.pool.w13_SDF2[t.slot].copy_(self.store.w13(layer, expert))
        self.pool.w2_SFD[t.slot].copy_(self.store.w2(layer, expert))
        t.done = True

    def ready(self, t: Ticket) -> bool:
        return t.done

    def wait(self, t: Ticket) -> None:
        """Run queued copies up to and including t; the time is stall (nothing overlaps here)."""
        t0 = time.perf_counter()
        while not t.done:
            self._run_oldest()
        self.stall_s += time.perf_counter() - t0

    def progress(self, block: bool = False) -> None:
        """The 'stream' advances by one copy (block=False) or drains (block=True)."""
        if block:
            while self.inflight:
                self._run_oldest()
        elif self.inflight:
            self._run_oldest()

    def settle(self) -> None:
        """Between forward passes the host has nothing else to run, so queued copies land."""
        self.progress(block=True)

    def mark_read(self, slot: int) -> None:
        """Compute here is synchronous: a slot is free again as soon as the kernel returns."""

    def synchronize(self) -> None:
        self.progress(block=True)

    def collect_stall(self) -> None:
        """Stall time is measured directly in wait()."""


class CudaCopyEngine(_CopyEngineBase):
    """Copies on a dedicated CUDA stream from pinned host memory, ordered with per-slot events."""

    def __init__(self, store: HostExpertStore, pool: SlotPool, device: torch.device):
        super().__init__(store, pool)
        if not store.pinned:
            raise ValueError("CudaCopyEngine needs a pinned store: pageable copies are synchronous and slow")
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        S = pool.num_slots
        # All events are created once: per slot, when its last copy lands and when its last reader ran.
        self.copy_done = [torch.cuda.Event() for _ in range(S)]
        self.slot_free = [torch.cuda.Event() for _ in range(S)]
        self._timers = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                        for _ in range(4 * S)]
        self._timer_used = 0

    def issue(self, key: Key, slot: int) -> Ticket:
        t = self._ticket(key, slot)
        layer, expert = key
        with torch.cuda.stream(self.stream):
            # GPU-side wait, no host sync: the last kernel reading this slot must finish first.
            self.stream.wait_event(self.slot_free[slot])
            self.pool.w13_SDF2[slot].copy_(self.store.w13(layer, expert), non_blocking=True)
            self.pool.w2_SFD[slot].copy_(self.store.w2(layer, expert), non_blocking=True)
            self.copy_done[slot].record(self.stream)
        self.inflight.append(t)
        return t

    def ready(self, t: Ticket) -> bool:
        # A newer copy into the same slot is later on the stream, so its completion implies t's.
        if not t.done and self.copy_done[t.slot].query():  # non-blocking query, no sync
            t.done = True
        return t.done

    def wait(self, t: Ticket) -> None:
        """The compute stream (not the host) waits for t's copy; timed with an event pair."""
        if self.ready(t):
            return
        compute = torch.cuda.current_stream(self.device)
        if self._timer_used == len(self._timers):
            self.collect_stall()
        start, end = self._timers[self._timer_used]
        self._timer_used += 1
        start.record(compute)
        compute.wait_event(self.copy_done[t.slot])  # GPU-side wait only
        end.record(compute)

    def progress(self, block: bool = False) -> None:
        if block:
            self.stream.synchronize()  # host sync: only at shutdown / calibration
        while self.inflight and self.ready(self.inflight[0]):
            self.inflight.popleft()

    def settle(self) -> None:
        """Between forward passes: forget copies that landed (a query; the copies keep running)."""
        self.progress(block=False)

    def mark_read(self, slot: int) -> None:
        self.slot_free[slot].record(torch.cuda.current_stream(self.device))

    def synchronize(self) -> None:
        self.progress(block=True)

    def collect_stall(self) -> None:
        """Add the timed waits to stall_s. Host sync on the last timer event (once per token)."""
        if self._timer_used:
            self._timers[self._timer_used - 1][1].synchronize()
            self.stall_s += sum(s.elapsed_time(e) for s, e in self._timers[:self._timer_used]) / 1e3
            self._timer_used = 0


class RecencyGuard:
    """Checks the predictor online against "the experts this layer used in the previous pass".

    When a model keeps choosing the same experts (a repetitive continuation, a long run of similar
    tokens), the last pass predicts the next one better than lookahead gating does, and a wrong
    prefetch would evict exactly the expert about to be reused. While recency's precision (EMA over
    scored layers) beats the predictor's, prefetches may not evict an expert recency expects; they
    still fill free slots and slots nobody expects. Precision = |guess & used| / |guess| for both.
    """

    def __init__(self, decay: float = 0.9, warmup: int = 8):
        self.decay, self.warmup = decay, warmup
        self.last: dict[int, set[int]] = {}
        self.pred_ema = self.recency_ema = 0.0
        self.scored = 0
        self.active_passes = 0

    def observe(self, layer: int, used: set[int], predicted: list[set[int]]) -> None:
        prev = self.last.get(layer)
        guesses = [p for p in predicted if p]
        if prev and guesses and used:
            pred = sum(len(p & used) / len(p) for p in guesses) / len(guesses)
            rec = len(prev & used) / len(prev)
            a = self.decay if self.scored else 0.0
            self.pred_ema = a * self.pred_ema + (1 - a) * pred
            self.recency_ema = a * self.recency_ema + (1 - a) * rec
            self.scored += 1
        self.last[layer] = set(used)

    @property
    def active(self) -> bool:
        return self.scored >= self.warmup and self.recency_ema > self.pred_ema

    def protect(self, predicted: dict[Key, int], capacity: int) -> dict[Key, int]:
        """The protected set for a prefetch: the predicted experts, plus recency's when it predicts
        better AND its experts fit in the cache (with large batches a layer uses most of its experts,
        so recency's high precision comes from guessing everything, which no cache can hold)."""
        if not self.active or sum(len(u) for u in self.last.values()) > capacity:
            return predicted
        merged = {(layer, e): layer for layer, used in self.last.items() for e in used}
        merged.update(predicted)
        return merged


def make_copy_engine(store: HostExpertStore, pool: SlotPool) -> HostCopyEngine | CudaCopyEngine:
    if pool.device.type == "cuda":
        return CudaCopyEngine(store, pool, pool.device)
    return HostCopyEngine(store, pool)


__all__ = ["PrefetchRequest", "PrefetchQueue", "Ticket", "HostCopyEngine", "CudaCopyEngine", "RecencyGuard",
           "make_copy_engine"]
