"""RunBoard: a small Ray actor each rank tells where it is (phase, step), and where a rank leaves
an error that retrying cannot fix and rank 0 leaves the run's summary.

Why: a rank that hangs (SIGSTOP, a stuck driver call, a deadlock) does not fail; its peers fail
instead, when their collective times out (TorchConfig.timeout_s). The board lets the peer that
timed out name the rank that stopped moving, rather than itself. Only small plain dicts pass
through it (Ray's own serialisation of str/int/float), never tensors.
"""
from __future__ import annotations

import time
from typing import Any


class RunBoard:
    """Made a Ray actor by cluster.job (ray.remote(RunBoard).options(num_cpus=0))."""

    def __init__(self, world: int):
        self.world = world
        self.seen: dict[int, tuple[str, int, float]] = {}
        self.fatal: list[str] = []
        self.summary: dict[str, Any] | None = None
        self.timed_out: set[int] = set()
        self.hang: str | None = None
        self.ranks: dict[int, dict[str, Any]] = {}
        self.starts: dict[int, int] = {}

    def start(self, rank: int) -> int:
        """Called by each rank as it starts; returns how many times this rank started before (the
        attempt number: Ray Train restarts the whole group together)."""
        self.starts[rank] = self.starts.get(rank, -1) + 1
        return self.starts[rank]

    def beat(self, rank: int, phase: str, step: int) -> None:
        self.seen[rank] = (phase, step, time.time())

    def report_fatal(self, message: str) -> None:
        if message not in self.fatal:
            self.fatal.append(message)

    def report_timeout(self, rank: int) -> None:
        self.timed_out.add(rank)

    def clear_timeouts(self) -> None:
        self.timed_out.clear()

    def report_hang(self, message: str) -> None:
        self.hang = message

    def report_rank(self, rank: int, stats: dict[str, Any]) -> None:
        """Per-rank numbers for the summary (memory: peak RSS, parameter and optimizer bytes)."""
        self.ranks[rank] = stats

    def finish(self, summary: dict[str, Any]) -> None:
        self.summary = summary

    def state(self) -> dict[str, Any]:
        return {"seen": dict(self.seen), "fatal": list(self.fatal), "summary": self.summary,
                "timed_out": sorted(self.timed_out), "hang": self.hang, "ranks": dict(self.ranks), "now": time.time()}


def stalled_ranks(state: dict[str, Any], world: int) -> str | None:
    """Describe the ranks that did NOT report a timed-out collective (the ones their peers waited
    for), with where each was last seen; None when every rank timed out or none did."""
    seen, now, timed_out = state["seen"], state["now"], set(state["timed_out"])
    stuck = [r for r in range(world) if r not in timed_out]
    if not timed_out or not stuck:
        return None
    parts = []
    for r in stuck:
        if r in seen:
            phase, step, t = seen[r]
            parts.append(f"rank {r} stopped responding (last seen in {phase} at step {step}, {now - t:.1f}s ago)")
        else:
            parts.append(f"rank {r} stopped responding (never reached setup)")
    return "; ".join(parts) + f"; ranks {sorted(timed_out)} timed out waiting for it"


__all__ = ["RunBoard", "stalled_ranks"]
