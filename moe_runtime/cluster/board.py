"""RunBoard: a small Ray actor each rank tells where it is (phase, step), and where a rank leaves
an error that retrying cannot fix and rank 0 leaves the run's summary.

Why: a rank that hangs (SIGSTOP, a stuck driver call, a deadlock) does not fail; its peers fail
instead, when their collective times out (TorchConfig.timeout_s). The board lets the peer that
timed out name the rank that stopped moving, rather than itself. Only small plain dicts pass
through it (Ray's own serialisation of str/int/float), never tensors.
"""
from __future__ import annotations

import time
from pathlib import Path
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
        self.pids: dict[int, tuple[int, str]] = {}
        self.group: tuple[str, float, list[dict[str, Any]]] = ("worker start", time.time(), [])
        self.group_starts = 0
        self.controller_handle = None
        self.stopping = False
        self.last_step = -1  # the highest step any rank reached, across attempts (the interrupt line)

    def start(self, rank: int, pid: int = 0, node: str = "") -> int:
        """Called by each rank as it starts; returns how many times this rank started before (the
        attempt number: Ray Train restarts the whole group together)."""
        self.starts[rank] = self.starts.get(rank, -1) + 1
        self.pids[rank] = (pid, node)
        self.seen[rank] = ("setup", 0, time.time())
        return self.starts[rank]

    # -- where Ray Train's worker group is (GroupPhases, a callback in the Train controller)
    def set_controller(self, handle) -> None:
        self.controller_handle = handle

    def controller(self):
        return self.controller_handle

    def group_phase(self, phase: str, workers: list[dict[str, Any]] | None = None) -> None:
        """'worker start' (actors being created, no ranks yet), 'process-group init' (ranks known),
        'setup' (the process group is up: rank_main runs), 'stopped'."""
        if phase == "worker start":
            self.group_starts += 1
            self.seen.clear()  # a new group: the last one's beats say nothing about it
        self.group = (phase, time.time(), workers if workers is not None else self.group[2])

    def ping(self) -> bool:
        return not self.stopping

    def stop(self) -> None:
        """The driver is ending the run (Ctrl-C, SIGTERM): ranks write no further checkpoint."""
        self.stopping = True

    def beat(self, rank: int, phase: str, step: int) -> None:
        self.seen[rank] = (phase, step, time.time())
        self.last_step = max(self.last_step, step)

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
                "timed_out": sorted(self.timed_out), "hang": self.hang, "ranks": dict(self.ranks), "now": time.time(),
                "pids": dict(self.pids), "group": self.group, "group_starts": self.group_starts,
                "starts": dict(self.starts), "last_step": self.last_step}


def process_start_time(pid: int) -> int | None:
    """The start time of process pid (clock ticks since boot, /proc/<pid>/stat field 22), or None
    if there is no such process; with the pid it identifies one process (pids are reused)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def process_state(pid: int) -> str | None:
    """The state letter of a local process (/proc/<pid>/stat: R running, S sleeping, T stopped...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


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


__all__ = ["RunBoard", "process_start_time", "process_state", "stalled_ranks"]
