"""Trace-driven cache simulator: replay a routing trace for every policy and capacity, on CPU.

Legend: L MoE layers, E experts, K top-k, d lookahead distance.

The replay uses the engine's own ExpertCache and policies, and a two-resource timeline: one copy
engine (a copy takes copy_s and starts when the previous copy ended and the request exists) and
the compute stream. Per forward pass and MoE layer m:
1. predictive policies name the experts of layers m .. m+depth; missing ones are copied in
   deadline order into slots the policy may evict (never a predicted expert);
2. attention runs for attn_s;
3. each used expert is a hit (it may still be landing: the wait is stall) or a miss, copied on
   demand after the queued copies (stall until it lands); then it runs for expert_s(tokens).
Policies: lru, lfu (no prefetch: the engine's baselines), predictive (learned predictor from the
trace itself, so in-sample), oracle (knows the coming layers exactly: the bound that exact
pre-attention routing reaches at distance 0). Timing comes from the calibration recorded in the
trace or from the caller; nothing is assumed about hardware.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from offload.cache import ExpertCache
from offload.cpu_experts import Calibration, interpolate
from offload.predictor import LearnedPredictor
from offload.trace import RoutingTrace

SIM_POLICIES = ("lru", "lfu", "predictive", "oracle")


@dataclass(frozen=True)
class SimTiming:
    copy_s: float
    """One expert host -> device."""
    attn_s: float
    """Non-expert compute per MoE layer (the window a prefetch hides in)."""
    tokens: tuple[int, ...]
    expert_s: tuple[float, ...]
    """Device time of one expert per token count in `tokens`."""

    @classmethod
    def from_calibration(cls, cal: Calibration) -> "SimTiming":
        return cls(cal.copy_s, cal.attn_s, cal.tokens, cal.device_s)

    def expert_time(self, n: int) -> float:
        return interpolate(self.tokens, self.expert_s, n)


def trace_timing(trace: RoutingTrace, copy_ms: float | None = None, attn_ms: float | None = None,
                 expert_ms: float | None = None) -> SimTiming:
    """The trace's recorded calibration, with any value the caller gives overriding it."""
    cal = trace.meta.get("calibration")
    if cal is None and None in (copy_ms, attn_ms, expert_ms):
        raise ValueError("the trace carries no calibration (it was not recorded by the expert-cache engine); "
                         "pass --copy-ms, --attn-ms and --expert-ms")
    base = SimTiming.from_calibration(Calibration.from_dict(cal)) if cal else SimTiming(0.0, 0.0, (1,), (0.0,))
    return SimTiming(copy_ms / 1e3 if copy_ms is not None else base.copy_s,
                     attn_ms / 1e3 if attn_ms is not None else base.attn_s,
                     (1,) if expert_ms is not None else base.tokens,
                     (expert_ms / 1e3,) if expert_ms is not None else base.expert_s)


def _step_views(trace: RoutingTrace) -> list[dict[str, Any]]:
    """Per forward pass: per layer {expert: tokens}, and the complete tokens' choices."""
    steps: dict[int, dict[str, Any]] = {}
    for i in range(len(trace)):
        st = steps.setdefault(int(trace.step[i]), {"used": [dict() for _ in range(trace.num_layers)]})
        used = st["used"][int(trace.layer[i])]
        for e in trace.experts[i].tolist():
            used[e] = used.get(e, 0) + 1
    choices, prev, step = trace.token_table()
    for s, st in steps.items():
        rows = (step == s).nonzero().flatten()
        st["choices"] = choices[rows]
        p = prev[rows]
        st["prev"] = torch.where((p >= 0)[:, None, None], choices[p.clamp_min(0)], torch.full((), -1))
    return [steps[s] for s in sorted(steps)]


def _predict(policy: str, st: dict[str, Any], m: int, depth: int, L: int, learned) -> dict[tuple[int, int], int]:
    out: dict[tuple[int, int], int] = {}
    for d in range(depth + 1):
        j = m + d
        if j >= L:
            break
        if policy == "oracle":
            experts = st["used"][j].keys()
        else:
            ch, pv = st["choices"], st["prev"]
            if ch.shape[0] == 0:
                continue
            src = ch[:, j - d - 1] if j - d - 1 >= 0 else None
            prev = pv[:, j]  # rows at a sequence start hold -1: no feature
            experts = set(learned.predict_topk(j, d, src, prev, ch.shape[0])[0].flatten().tolist())
        for e in experts:
            out.setdefault((j, e), j)
    return out


def simulate(trace: RoutingTrace, policy: str, capacity: int, timing: SimTiming, *, depth: int = 1,
             learned: LearnedPredictor | None = None, steps: list | None = None) -> dict[str, Any]:
    """Replay `trace` with `capacity` slots; hit rate, bytes moved, predicted stall and time."""
    if policy not in SIM_POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {', '.join(SIM_POLICIES)}")
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1 slot")
    if policy == "predictive" and learned is None:
        learned = LearnedPredictor.fit(trace, depth)
    steps = steps if steps is not None else _step_views(trace)
    cache = ExpertCache(capacity, "predictive" if policy == "oracle" else policy)
    L, expert_bytes = trace.num_layers, int(trace.meta.get("expert_bytes", 0))
    t = copy_free = stall = 0.0
    hits = misses = copies = 0
    ready_at: dict[tuple[int, int], float] = {}
    for st in steps:
        for m in range(L):
            protected = _predict(policy, st, m, depth, L, learned) if policy in ("predictive", "oracle") else {}
            for key in sorted(protected, key=protected.get):
                if key in cache:
                    continue
                slot = cache.choose_slot(protected, force=False)
                if slot is None:
                    break
                cache.assign(key, slot)
                copy_free = ready_at[key] = max(copy_free, t) + timing.copy_s
                copies += 1
            t += timing.attn_s
            protected = {k: v for k, v in protected.items() if v > m}
            for e, n in sorted(st["used"][m].items()):
                key = (m, e)
                if key in cache:
                    hits += 1
                    wait = max(0.0, ready_at.get(key, 0.0) - t)
                else:
                    misses += 1
                    cache.assign(key, cache.choose_slot(protected, force=True))
                    copy_free = ready_at[key] = max(copy_free, t) + timing.copy_s
                    copies += 1
                    wait = copy_free - t
                stall += wait
                t += wait + timing.expert_time(n)
                cache.access(key)
    uses = hits + misses
    return {"policy": policy, "capacity": capacity, "cache_fraction": capacity / (L * trace.num_experts),
            "hits": hits, "misses": misses, "hit_rate": hits / uses if uses else None, "copies": copies,
            "bytes_moved": copies * expert_bytes, "stall_s": stall, "time_s": t, "passes": len(steps)}


def parse_capacities(spec: str, total: int) -> list[int]:
    """'25%,50%,12' -> slots; percentages are of all experts of all layers."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            slots = round(float(part[:-1]) / 100 * total) if part.endswith("%") else int(part)
        except ValueError:
            raise ValueError(f"capacity {part!r} is neither a slot count nor a percentage like 25%") from None
        out.append(max(1, min(total, slots)))
    return out


def simulate_grid(trace: RoutingTrace, policies: list[str], capacities: list[int], timing: SimTiming, *,
                  depth: int = 1) -> list[dict[str, Any]]:
    steps = _step_views(trace)
    learned = LearnedPredictor.fit(trace, depth) if "predictive" in policies else None
    return [simulate(trace, p, c, timing, depth=depth, learned=learned, steps=steps)
            for c in capacities for p in policies]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'policy':>10} {'slots':>6} {'cache':>6} {'hit rate':>9} {'MiB moved':>10} {'stall ms':>9} {'time ms':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        hr = "n/a" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        lines.append(f"{r['policy']:>10} {r['capacity']:>6} {r['cache_fraction']:>6.0%} {hr:>9} "
                     f"{r['bytes_moved'] / 2**20:>10.2f} {r['stall_s'] * 1e3:>9.2f} {r['time_s'] * 1e3:>9.2f}")
    return "\n".join(lines)


__all__ = ["SimTiming", "simulate", "simulate_grid", "trace_timing", "parse_capacities", "format_table",
           "SIM_POLICIES"]
