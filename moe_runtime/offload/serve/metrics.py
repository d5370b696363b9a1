"""Server metrics for `moe serve`, rendered in the Prometheus text exposition format (v0.0.4).

Counters are cumulative since start; tokens/s is the rate of generated tokens over the last
`window_s` seconds. The expert-cache figures (hit rate, prefetch precision, bytes moved, stall
time) come from the engine's own statistics through `cache_source`, read at scrape time.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable

PREFIX = "moe_serve_"


class ServerMetrics:
    """Thread-safe counters written by the HTTP layer and the scheduler thread."""

    def __init__(self, cache_source: Callable[[], dict[str, Any]] | None = None, window_s: float = 10.0):
        self._lock = threading.Lock()
        self.cache_source, self.window_s = cache_source, window_s
        self.requests: dict[tuple[str, int], int] = {}
        self.finish: dict[str, int] = {}
        self.prompt_tokens = self.completion_tokens = 0
        self.prefill_s = self.decode_s = 0.0
        self.decode_steps = self.decode_rows = 0
        self.queue_depth = self.running = 0
        self._recent: deque[tuple[float, int]] = deque()

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def set_queue(self, depth: int, running: int) -> None:
        self.queue_depth, self.running = depth, running

    def prefill(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self.prompt_tokens += tokens
            self.prefill_s += seconds

    def decode_step(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.decode_steps += 1
            self.decode_rows += rows
            self.decode_s += seconds

    def tokens_out(self, n: int) -> None:
        t = time.monotonic()
        with self._lock:
            self.completion_tokens += n
            self._recent.append((t, n))

    def finished(self, reason: str) -> None:
        with self._lock:
            self.finish[reason] = self.finish.get(reason, 0) + 1

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - self.window_s:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self.window_s

    def snapshot(self) -> dict[str, Any]:
        """The numbers /metrics shows, as a dict (also used by tests and the load test)."""
        with self._lock:
            snap = {"requests": dict(self.requests), "finish": dict(self.finish),
                    "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                    "prefill_s": self.prefill_s, "decode_s": self.decode_s, "decode_steps": self.decode_steps,
                    "mean_batch": self.decode_rows / self.decode_steps if self.decode_steps else 0.0,
                    "queue_depth": self.queue_depth, "running": self.running}
        snap["tokens_per_s"] = self.tokens_per_s()
        snap["cache"] = self.cache_source() if self.cache_source is not None else {}
        return snap

    def render(self) -> str:
        """Prometheus text format."""
        s, out = self.snapshot(), []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {PREFIX}{name} {help_}")
            out.append(f"# TYPE {PREFIX}{name} {kind}")
            out.extend(f"{PREFIX}{name}{labels} {_num(v)}" for labels, v in samples)

        metric("requests_total", "counter", "HTTP requests by endpoint and status code.",
               [(f'{{endpoint="{e}",status="{c}"}}', n) for (e, c), n in sorted(s["requests"].items())])
        metric("finished_total", "counter", "Generations by finish reason.",
               [(f'{{reason="{r}"}}', n) for r, n in sorted(s["finish"].items())])
        metric("prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", s["prompt_tokens"])])
        metric("completion_tokens_total", "counter", "Tokens generated.", [("", s["completion_tokens"])])
        metric("tokens_per_second", "gauge", f"Generated tokens per second over the last {self.window_s:g} s.",
               [("", s["tokens_per_s"])])
        metric("queue_depth", "gauge", "Requests waiting for a batch row.", [("", s["queue_depth"])])
        metric("running_sequences", "gauge", "Sequences in the running batch.", [("", s["running"])])
        metric("decode_steps_total", "counter", "Batched decode steps.", [("", s["decode_steps"])])
        metric("mean_batch_size", "gauge", "Mean rows per decode step since start.", [("", s["mean_batch"])])
        metric("prefill_seconds_total", "counter", "Time in prefill forward passes.", [("", s["prefill_s"])])
        metric("decode_seconds_total", "counter", "Time in decode steps.", [("", s["decode_s"])])
        for key, kind, help_ in CACHE_METRICS:
            v = s["cache"].get(key)
            if v is not None:
                metric(key, kind, help_, [("", v)])
        return "\n".join(out) + "\n"


CACHE_METRICS = (
    ("expert_cache_hit_rate", "gauge", "Expert uses served from a device slot / all expert uses, since start."),
    ("expert_uses_total", "counter", "Expert uses (one layer-expert pair per forward pass)."),
    ("expert_cache_hits_total", "counter", "Expert uses served from a device slot."),
    ("prefetch_precision", "gauge", "Predicted experts that were used / predicted, since start."),
    ("prefetch_recall", "gauge", "Used experts that were predicted / used, since start."),
    ("expert_bytes_moved_total", "counter", "Host-to-device expert bytes copied."),
    ("expert_stall_seconds_total", "counter", "Time the device waited for expert copies."),
    ("expert_copies_total", "counter", "Host-to-device expert copies."),
    ("expert_host_runs_total", "counter", "Expert uses run on host cores instead of copied."),
    ("expert_split_runs_total", "counter", "Expert uses run split: host cores on part of W13 while the rest was copied."),
    ("stream_steps_total", "counter", "MoE layer steps in the streaming regime (whole layers copied)."),
    ("cache_steps_total", "counter", "MoE layer steps in the cache regime."),
)


def engine_cache_stats(engine: Any) -> dict[str, float]:
    """Cumulative expert-cache figures of an ExpertCacheEngine (its CacheStats), named as above."""
    snap = engine.stats.snapshot()
    c, pred = snap.counters, engine.stats.prediction()
    out = {"expert_uses_total": c.expert_uses, "expert_cache_hits_total": c.hits,
           "expert_bytes_moved_total": snap.bytes_moved, "expert_stall_seconds_total": float(snap.stall_s),
           "expert_copies_total": snap.copies, "expert_host_runs_total": c.cpu_served,
           "expert_split_runs_total": c.split_runs, "stream_steps_total": c.stream_steps,
           "cache_steps_total": c.cache_steps}
    if c.expert_uses:
        out["expert_cache_hit_rate"] = c.hits / c.expert_uses
    for key in ("precision", "recall"):
        if pred.get(key) is not None:
            out[f"prefetch_{key}"] = float(pred[key])
    return out


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def parse_prometheus(text: str) -> dict[str, float]:
    """{'name{labels}': value} of a Prometheus text page (for tests and the load test)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            out[key] = float(val)
    return out


__all__ = ["ServerMetrics", "CACHE_METRICS", "engine_cache_stats", "parse_prometheus", "PREFIX"]
