"""Reports of the expert-cache engine: one JSON-able dict, and the lines `moe generate` prints.

Metrics (decode phase unless named otherwise; the prefill's own are under "prefill"):
- tokens_per_s: generated tokens / (prefill + decode wall time); decode_tokens_per_s: tokens
  produced by decode forward passes / decode wall time (the steady-state speed). Sequences that
  stop early (EOS, stop strings) generate fewer tokens: generated_tokens counts what was made.
- hit_rate: expert uses served from a slot already assigned at use time (it may still have been
  landing: late_hits) / all expert uses. A use is one (layer, expert) pair per forward pass.
- bytes_moved: host->device expert bytes (demand, prefetch, stream, background copies).
- stall_s: time the device waited for expert copies (CUDA: timed on the compute stream with
  events; host-as-device: the copies waited on, since nothing overlaps there).
- prefetch precision/recall: per (layer, distance), predicted vs used expert sets per pass.
"""
from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, torch threads={torch.get_num_threads()})"


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _rate(num: float, den: float) -> float | None:
    return num / den if den else None


def engine_report(engine) -> dict[str, Any]:
    """The report of an ExpertCacheEngine (or anything with the same pool / store / stats)."""
    lay = engine.store.layout
    return {
        "device": str(engine.device), "device_name": device_name(engine.device),
        "policy": engine.policy, "cpu_experts": engine.cpu_experts, "predictor": engine.predictor_name,
        "lookahead_depth": engine.depth,
        "slots": engine.pool.num_slots, "total_experts": lay.total_experts,
        "cache_fraction": engine.pool.num_slots / lay.total_experts, "pool_bytes": engine.pool.nbytes,
        "store": engine.store.report(), "calibration": engine.calibration.to_dict(),
        "plan": getattr(engine, "plan", None),
        **stats_report(engine.stats),
    }


def stats_report(stats) -> dict[str, Any]:
    """Speed, hit rate, bytes, stall and prediction quality from an offload.stats.CacheStats."""
    pre, decode, total = stats.phases()
    t = stats.timing
    return {
        "batch": t.batch, "prompt_tokens": t.prompt_tokens, "new_tokens": t.new_tokens,
        "generated_tokens": t.generated_tokens, "prefill_s": t.prefill_s, "decode_s": t.decode_s,
        "tokens_per_s": _rate(t.generated_tokens, t.prefill_s + t.decode_s),
        "decode_tokens_per_s": _rate(t.decode_tokens, t.decode_s),
        "hit_rate": decode.counters.as_dict()["hit_rate"], "hit_rate_all": total.counters.as_dict()["hit_rate"],
        "bytes_moved": decode.bytes_moved, "gib_moved": decode.bytes_moved / 2**30,
        "stall_s": decode.stall_s,
        "decode": decode.counters.as_dict(),
        "prefill": {**pre.counters.as_dict(), "bytes_moved": pre.bytes_moved, "stall_s": pre.stall_s},
        "decisions": dict(total.decisions),
        "prefetch": {"issued": total.counters.prefetch_issued, "used": total.counters.prefetch_used,
                     "wasted": total.counters.prefetch_wasted, **total.queue},
        "prediction": stats.prediction(),
    }


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def summary_lines(r: dict[str, Any]) -> list[str]:
    """The human-readable lines `moe generate` prints after the text."""
    p = r["prediction"]
    lines = [
        f"device {r['device_name']}; policy {r['policy']}; predictor {r['predictor']}; cpu experts "
        f"{'on' if r['cpu_experts'] else 'off'}; {r['slots']}/{r['total_experts']} expert slots "
        f"({r['cache_fraction']:.0%}, {r['pool_bytes'] / 2**20:.1f} MiB); host store "
        f"{r['store']['total_bytes'] / 2**20:.1f} MiB{' pinned' if r['store']['pinned'] else ''}",
        f"tokens/s {_fmt(r['tokens_per_s'], '.2f')} (decode {_fmt(r['decode_tokens_per_s'], '.2f')}); "
        f"prefill {r['prefill_s']:.3f}s, decode {r['decode_s']:.3f}s, batch {r['batch']}",
        f"hit rate {_fmt(r['hit_rate'], '.3f')} (decode; all {_fmt(r['hit_rate_all'], '.3f')}); "
        f"bytes moved {r['bytes_moved'] / 2**20:.1f} MiB (decode), stall {r['stall_s'] * 1e3:.1f} ms",
        f"prefetch precision {_fmt(p['precision'], '.3f')}, recall {_fmt(p['recall'], '.3f')}; issued "
        f"{r['prefetch']['issued']}, used {r['prefetch']['used']}, wasted {r['prefetch']['wasted']}, "
        f"pre-empted {r['prefetch']['preempted']}",
        f"misses served: copy {r['decisions']['copy']}, wait {r['decisions']['wait']}, cpu {r['decisions']['cpu']}, "
        f"split {r['decode']['split_runs'] + r['prefill']['split_runs']}; "
        f"regimes: cache {r['decode']['cache_steps'] + r['prefill']['cache_steps']}, "
        f"stream {r['decode']['stream_steps'] + r['prefill']['stream_steps']}; copy "
        f"{r['calibration']['copy_gbps']:.2f} GB/s measured",
    ]
    plan = r.get("plan")
    if plan:
        lines.append(plan_line(plan))
    return lines


def plan_line(plan: dict[str, Any]) -> str:
    """policy=default: which plan serves and why."""
    if plan["state"] == "calibrating":
        return (f"plan: still calibrating ({plan['calibration_tokens']} decode steps in the window; the adaptive "
                f"planner served this run)")
    head = f"plan: {plan['chosen']}"
    if plan["state"] == "chosen" and plan.get("calibration_tokens"):
        head += f" after a {plan['calibration_tokens']}-step calibration window ({plan['switch_copies']} copies to switch)"
    scores = ", ".join(f"{c} {v:.2f}" for c, v in sorted(plan["calibration_tok_s"].items(), key=lambda kv: -kv[1]))
    return head + f"; {plan['reason']}" + (f"; modelled tok/s: {scores}" if scores else "")


__all__ = ["engine_report", "stats_report", "summary_lines", "plan_line"]
