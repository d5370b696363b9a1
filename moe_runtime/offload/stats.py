"""The one owner of the expert cache's statistics: reset, snapshot, prefill / decode split.

The counters themselves are kept where the work happens (the planner's Tally and miss
decisions, read through the runtime's `c` / `decisions` / `queue` / `pred_stats`, the copy engine's bytes and stall time, the prefetch queue's submissions, the
prediction scores); this class is the only code that zeroes them or reads them for a report,
so the engine, the transformers integration and the report never touch those fields directly.
A generation is: reset() -> prefill pass(es) -> mark_prefill() -> decode passes -> mark_done().
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class StatsSnapshot:
    """Cumulative statistics at one instant; `minus` gives a phase."""

    counters: Any
    """moe_runtime.offload.decision.Tally (expert uses, hits, misses, copies by kind, regimes)."""
    decisions: dict[str, int]
    """How misses and late hits were served: wait / copy / cpu."""
    bytes_moved: int
    stall_s: float
    copies: int
    queue: dict[str, int]
    """Prefetch requests submitted / pre-empted / dropped."""

    def minus(self, other: "StatsSnapshot") -> "StatsSnapshot":
        return StatsSnapshot(
            counters=self.counters.minus(other.counters),
            decisions={k: v - other.decisions.get(k, 0) for k, v in self.decisions.items()},
            bytes_moved=self.bytes_moved - other.bytes_moved, stall_s=self.stall_s - other.stall_s,
            copies=self.copies - other.copies, queue={k: v - other.queue.get(k, 0) for k, v in self.queue.items()})


@dataclass
class Timing:
    batch: int = 0
    prompt_tokens: int = 0
    """Longest prompt (the padded width)."""
    new_tokens: int = 0
    """max_new_tokens asked for."""
    generated_tokens: int = 0
    """Tokens actually generated, all sequences (stopped sequences generate fewer)."""
    decode_tokens: int = 0
    """Tokens produced by decode passes (generated minus each sequence's first, from the prefill)."""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    forward_passes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class CacheStats:
    """Reset / snapshot over one OffloadRuntime and its copy engine (see module docstring)."""

    runtime: Any
    copies: Any
    prefill: StatsSnapshot | None = None
    timing: Timing = field(default_factory=Timing)

    def reset(self) -> None:
        rt, cp = self.runtime, self.copies
        rt.c, rt.decisions = type(rt.c)(), dict.fromkeys(rt.decisions, 0)
        rt.pred_stats.counts.clear()
        cp.bytes_moved, cp.stall_s, cp.copies = 0, 0.0, 0
        q = rt.queue
        q.submitted = q.preempted = q.dropped = 0
        self.prefill, self.timing = None, Timing()

    def snapshot(self) -> StatsSnapshot:
        rt, cp, q = self.runtime, self.copies, self.runtime.queue
        return StatsSnapshot(counters=type(rt.c)(**vars(rt.c)), decisions=dict(rt.decisions),
                             bytes_moved=cp.bytes_moved, stall_s=cp.stall_s, copies=cp.copies,
                             queue={"submitted": q.submitted, "preempted": q.preempted, "dropped": q.dropped})

    def mark_prefill(self, seconds: float) -> None:
        """The prefill ended: what follows is decode."""
        self.prefill = self.snapshot()
        self.timing.prefill_s = seconds

    def mark_done(self, **timing) -> None:
        for k, v in timing.items():
            setattr(self.timing, k, v)

    def phases(self) -> tuple[StatsSnapshot, StatsSnapshot, StatsSnapshot]:
        """(prefill, decode, total). Without a marked prefill everything counts as decode."""
        total = self.snapshot()
        empty = _zero(total)
        pre = self.prefill or empty
        return pre, total.minus(pre), total

    def prediction(self) -> dict:
        return self.runtime.pred_stats.summary()


def _zero(like: StatsSnapshot) -> StatsSnapshot:
    return like.minus(like)


__all__ = ["CacheStats", "StatsSnapshot", "Timing"]
