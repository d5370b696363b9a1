"""Copy engines: move experts from the host store into device slots, ordered like work on a stream.

Legend: S slots. A key is (MoE layer index, expert id).

Two copy engines share one API (issue / ready / remaining / wait / progress / mark_read):
- CudaCopyEngine: copies on a dedicated stream from pinned memory, one `copy_done` event and one
  `slot_free` event per slot, both created once. The compute stream waits only on the events of
  the experts it uses; the copy stream waits on `slot_free` before overwriting a slot a queued
  kernel may still read. No host<->device sync except where commented.
- HostCopyEngine: the host is the "device". Copies are queued like work on a stream and executed
  in order when waited on or when `progress()` lets the "stream" advance, so in-flight, waiting
  and eviction-while-loading paths run (and are tested) on a machine without a GPU.
Which copy to issue, and when, is decided elsewhere (offload/decision.py); an engine only moves bytes.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from moe_runtime.offload.cache import Key, SlotPool
from moe_runtime.offload.store import HostExpertStore


@dataclass
class Ticket:
    key: Key
    slot: int
    seq: int
    eta: float
    """perf_counter time the copy is expected to finish (queue-aware estimate)."""
    done: bool = False
    rows: tuple[int, int, bool] = (0, 0, True)
    """W13 rows [first, end) and whether W2 is copied."""


def split_row(host_share: float, d_model: int) -> int:
    """The first W13 row a split run copies: host cores take rows [0, d) of the D input rows."""
    return min(d_model, max(0, round(host_share * d_model)))


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

    def _ticket(self, key: Key, slot: int, rows: tuple[int, int, bool]) -> Ticket:
        lo, hi, w2 = rows
        lay = self.store.layout
        numel = (hi - lo) * 2 * lay.d_expert + (lay.w2_numel if w2 else 0)
        nbytes = numel * lay.expert_bytes // lay.expert_numel
        now = time.perf_counter()
        self.last_eta = max(now, self.last_eta) + self.copy_s * nbytes / lay.expert_bytes
        self.seq += 1
        self.copies += w2  # a split run's fill (W13 rows only) completes the same expert's copy
        self.bytes_moved += nbytes
        return Ticket(key, slot, self.seq, self.last_eta, rows=rows)

    def _rows(self, host_share: float, fill: bool) -> tuple[int, int, bool]:
        """(first, end) of W13's rows to copy and whether W2 goes too: all (host_share 0), a split
        run's device part (rows d.. and W2) or its fill (rows ..d), d = split_row(host_share)."""
        D = self.store.layout.d_model
        if self.store.layout.quant is not None:
            # quantised bytes are not split by rows (int4 / MX groups run along them): a split run's
            # device part copies the whole expert and its fill has nothing left to move
            return (0, 0, False) if fill else (0, D, True)
        d = split_row(host_share, D)
        return (0, d, False) if fill else (d, D, True)

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

    def issue(self, key: Key, slot: int, host_share: float = 0.0, fill: bool = False) -> Ticket:
        """Queue a copy of key into slot: the whole expert, or a split run's part (see _rows)."""
        t = self._ticket(key, slot, self._rows(host_share, fill))
        self.inflight.append(t)
        return t

    def _run_oldest(self) -> None:
        t = self.inflight.popleft()
        layer, expert = t.key
        lo, hi, w2 = t.rows
        if self.pool.quant is not None:
            if w2:
                self.pool.quant[t.slot].copy_(self.store.quant_expert(layer, expert))
            t.done = True
            return
        self.pool.w13_SDF2[t.slot, lo:hi].copy_(self.store.w13(layer, expert)[lo:hi])
        if w2:
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

    def issue(self, key: Key, slot: int, host_share: float = 0.0, fill: bool = False) -> Ticket:
        """Queue a copy of key into slot: the whole expert, or a split run's part (contiguous W13
        rows; see _rows). A split run's compute waits on the event its device part recorded: the
        fill is issued after that wait is queued, so it re-records the event for the next use."""
        t = self._ticket(key, slot, self._rows(host_share, fill))
        layer, expert = key
        lo, hi, w2 = t.rows
        with torch.cuda.stream(self.stream):
            # GPU-side wait, no host sync: the last kernel reading this slot must finish first.
            self.stream.wait_event(self.slot_free[slot])
            if self.pool.quant is not None:  # quantised bytes, one DMA per field region
                if w2:
                    self.pool.quant[slot].copy_(self.store.quant_expert(layer, expert), non_blocking=True)
            else:
                self.pool.w13_SDF2[slot, lo:hi].copy_(self.store.w13(layer, expert)[lo:hi], non_blocking=True)
                if w2:
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


def make_copy_engine(store: HostExpertStore, pool: SlotPool) -> HostCopyEngine | CudaCopyEngine:
    if pool.device.type == "cuda":
        return CudaCopyEngine(store, pool, pool.device)
    return HostCopyEngine(store, pool)


__all__ = ["Ticket", "HostCopyEngine", "CudaCopyEngine", "make_copy_engine", "split_row"]
