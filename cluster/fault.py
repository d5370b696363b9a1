"""Liveness and recovery: run an attempt, and on a worker failure tear the group down and retry.

The driver never waits on a collective itself. It waits on the workers' task results with
ray.wait (WorkerGroup.wait), so the death of any actor is seen within `poll_s`; the surviving
actors, possibly blocked in a collective with the dead one, are ended with ray.kill (bounded
teardown; gloo's `collective_timeout_s` is the second bound, for a peer that hangs without dying).
The next attempt builds a new group (new processes, new rendezvous port, same placement group)
and every rank resumes from the newest committed checkpoint. Data batches depend only on
(seed, step, micro-batch) and the optimizer state is checkpointed, so a recovered run continues
exactly like an uninterrupted one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from cluster.actors import WorkerFailure


class ClusterTrainingError(RuntimeError):
    """Training failed more than max_failures times."""


def supervise(attempt_fn: Callable[[int], dict[str, Any]], max_failures: int,
              log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Call attempt_fn(0), attempt_fn(1) ... until one returns; each WorkerFailure costs one of
    max_failures. Other exceptions (configuration errors, bugs) propagate at once."""
    failures = 0
    while True:
        t0 = time.monotonic()
        try:
            result = attempt_fn(failures)
        except WorkerFailure as e:
            failures += 1
            rec = {"event": "worker_failure", "attempt": failures - 1, "error": str(e),
                   "seconds_in_attempt": round(time.monotonic() - t0, 2), "failures": failures,
                   "max_failures": max_failures}
            if log is not None:
                log(rec)
            if failures > max_failures:
                raise ClusterTrainingError(f"training failed {failures} times (max_failures={max_failures}); "
                                           f"last error: {e}. The newest committed checkpoint is kept; rerun "
                                           f"to resume, or raise --max-failures") from e
            continue
        result["failures"] = failures
        return result


def jsonl_logger(path: Path, prefix: str = "[cluster]") -> Callable[[dict[str, Any]], None]:
    """Driver-side events: printed, and appended to the run's metrics.jsonl (no worker is writing
    it while the driver does: the group is torn down between attempts)."""
    def log(rec: dict[str, Any]) -> None:
        print(f"{prefix} {rec.get('event')}: " + ", ".join(f"{k}={v}" for k, v in rec.items() if k != "event"),
              flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return log
