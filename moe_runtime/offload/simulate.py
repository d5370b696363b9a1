"""Trace-driven cache simulator: replay a routing trace through the engine's own Planner, on CPU.

Legend: L MoE layers, E experts, K top-k, T tokens of a forward pass, d lookahead distance.

The replay calls exactly what the engine calls, in the same order: per forward pass and MoE layer
m, `Planner.prefetch(m, predictions)` then `Planner.serve(m, {expert: tokens})`, then `end_pass`.
So the hits, misses, copies and bytes are the engine's on the same routing and predictions, and
the modelled time (offload/decision.py: calibrated attention, expert and copy times, the link a
FIFO queue) is the engine's model of itself. Policies:
- lru, lfu, predictive, mixtral-offloading, moe-infinity: the engine's own. predictive replays the
  engine's default predictor where the trace recorded it (predictor="recorded": lookahead gating,
  RoutingTrace.lookahead), else a learned predictor (pass one fitted on another trace or the first
  half, split_trace, to stay out of sample; without one it is fitted on the trace itself, in-sample);
  mixtral-offloading's speculative next-layer gate is stood in for by the learned one at distance 1;
- choose_policy: the default plan of a run, chosen on its calibration trace alone (see decision.py);
- default (simulate_default): what the engine's policy="default" does, whole: its calibration window
  (calibration_passes: the one definition of the window, shared with split_trace and the engine)
  run by the adaptive planner, the choice on that window, the switch (the chosen plan's warm or
  pinned set copied in) and the rest under the chosen plan; engine == simulator for it
  (tests/test_offload_default.py). bench/cache_policies.py scores its default row on the held-out
  half alone (every policy's warm set free), which is simulate_default's `after` part;
- oracle: predictive with exact predictions of layers m .. m+depth;
- belady: evicts the key used farthest in the future, no prefetch (the offline optimum of
  demand paging); belady-prefetch: the same with exact predictions and the cost model's prefetch;
- this-token-lru / this-token-lfu: Belady that sees only the rest of the current forward pass
  (LRU / LFU beyond it): how much of Belady's lead knowing the current token's routing explains.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moe_runtime.offload.cache import ExpertCache, Key
from moe_runtime.offload.cpu_experts import Calibration, CostModel
from moe_runtime.offload.decision import SCHEMES, Planner
from moe_runtime.offload.plan import PEERS
from moe_runtime.offload.predictor import LearnedPredictor, to_predictions
from moe_runtime.offload.trace import RoutingTrace

SIM_POLICIES = ("lru", "lfu", "predictive", "oracle", "belady", "belady-prefetch", "this-token-lru",
                "this-token-lfu", "mixtral-offloading", "moe-infinity", *PEERS, "default")
_LEARNED = ("predictive", "mixtral-offloading")


@dataclass
class Step:
    """One forward pass of a trace."""

    B: int
    S: int
    idx: list[torch.Tensor]
    """Per MoE layer [T, K] chosen experts, rows b * S + s (the engine's order)."""
    used: list[dict[int, int]]
    """Per MoE layer expert -> tokens routed to it."""
    look: list[np.ndarray] | None = None
    """Per MoE layer [T, depth + 1, K] recorded lookahead predictions for it (RoutingTrace.lookahead)."""


def steps_of(trace: RoutingTrace) -> list[Step]:
    """The trace as forward passes; every layer of a pass must be recorded."""
    out = []
    order = np.argsort(trace.step, kind="stable")
    bounds = np.flatnonzero(np.diff(trace.step[order])) + 1
    for rows in np.split(order, bounds):
        if rows.size == 0:
            continue
        layer = trace.layer[rows]
        B = len(np.unique(trace.seq[rows]))
        idx, used, look = [], [], []
        for m in range(trace.num_layers):
            sel = rows[layer == m]
            ids = torch.from_numpy(trace.experts[sel].astype(np.int64))
            idx.append(ids)
            e, n = np.unique(trace.experts[sel], return_counts=True)
            used.append({int(a): int(b) for a, b in zip(e, n)})
            if trace.lookahead is not None:
                look.append(trace.lookahead[sel])
        T = idx[0].shape[0]
        out.append(Step(B, T // max(B, 1), idx, used, look if trace.lookahead is not None else None))
    return out


def trace_timing(trace: RoutingTrace, copy_ms: float | None = None, attn_ms: float | None = None,
                 expert_ms: float | None = None) -> Calibration:
    """The trace's recorded calibration, with any value the caller gives overriding it."""
    cal = trace.meta.get("calibration")
    if cal is None and None in (copy_ms, attn_ms, expert_ms):
        raise ValueError("the trace carries no calibration (it was not recorded by the expert-cache engine); "
                         "pass --copy-ms, --attn-ms and --expert-ms, or --model-shape and --link")
    base = Calibration.from_dict(cal) if cal else Calibration(
        device="given", expert_bytes=int(trace.meta.get("expert_bytes", 0)), copy_s=0.0, tokens=(1,),
        host_s=(1.0,), device_s=(0.0,), act_s_per_token=0.0)
    return Calibration(device=base.device, expert_bytes=base.expert_bytes,
                       copy_s=copy_ms / 1e3 if copy_ms is not None else base.copy_s,
                       tokens=(1,) if expert_ms is not None else base.tokens,
                       host_s=(base.host_s[0],) if expert_ms is not None else base.host_s,
                       device_s=(expert_ms / 1e3,) if expert_ms is not None else base.device_s,
                       act_s_per_token=base.act_s_per_token,
                       attn_s=attn_ms / 1e3 if attn_ms is not None else base.attn_s)


def profile_of(steps: list[Step], L: int, E: int) -> np.ndarray:
    """[L, E] share of the passes of `steps` that used each key: a calibration profile."""
    out = np.zeros((L, E))
    for st in steps:
        for m in range(L):
            out[m, list(st.used[m])] += 1
    return out / max(1, len(steps))


CALIBRATION_SHARE = 0.5
"""The calibration part of a run: this share of its decode passes (calibration_passes)."""
MIN_CALIBRATION = 2
"""Decode passes a calibration window needs at least: choose_policy splits it once more."""


def calibration_passes(decode_passes: int, share: float = CALIBRATION_SHARE) -> int:
    """How many of a run's `decode_passes` decode passes (one token per sequence) form its
    calibration part: round(share x passes), at least 1 and at most all but one. The one definition
    of the calibration window: split_trace cuts a trace there, the engine's policy="default"
    (offload/engine.py) switches plans there when no --calibration-tokens is given."""
    return max(1, min(decode_passes - 1, round(share * decode_passes)))


def decode_steps(trace: RoutingTrace) -> list[int]:
    """The trace's decode passes in order: one token per sequence (S == 1), every layer recorded."""
    steps = np.unique(trace.step)
    S = {int(s): len(np.unique(trace.pos[trace.step == s])) for s in steps}
    B = {int(s): len(np.unique(trace.seq[trace.step == s])) for s in steps}
    return [int(s) for s in steps if trace.layer[trace.step == s].size == B[int(s)] * trace.num_layers and S[int(s)] == 1]


def split_trace(trace: RoutingTrace, share: float = CALIBRATION_SHARE, *,
                passes: int | None = None) -> tuple[RoutingTrace, RoutingTrace]:
    """(calibration, evaluation): the passes before the first `share` of the decode passes
    (calibration_passes; or the first `passes` decode passes; any prefill included) profile the hot
    sets and fit the predictor; the rest is what the policies are judged on, so neither ever sees
    the tokens it serves."""
    dec = decode_steps(trace)
    if len(dec) < 2:
        raise ValueError("the trace holds fewer than two decode passes: nothing to split into calibration and evaluation")
    k = calibration_passes(len(dec), share) if passes is None else passes
    if not 1 <= k < len(dec):
        raise ValueError(f"a calibration part of {k} decode passes leaves no evaluation part: the trace holds "
                         f"{len(dec)} decode passes")
    cut = dec[k]

    def part(mask: np.ndarray) -> RoutingTrace:
        return RoutingTrace(trace.num_layers, trace.num_experts, trace.top_k, trace.step[mask], trace.seq[mask],
                            trace.pos[mask], trace.layer[mask], trace.experts[mask], trace.scores[mask],
                            dict(trace.meta), lookahead=None if trace.lookahead is None else trace.lookahead[mask])
    return part(trace.step < cut), part(trace.step >= cut)


def _future(steps: list[Step], L: int) -> dict[Key, list[int]]:
    out: dict[Key, list[int]] = {}
    for p, st in enumerate(steps):
        for m in range(L):
            for e in st.used[m]:
                out.setdefault((m, e), []).append(p * L + m)
    return out


def _learned_predictions(learned, st: Step, prev: Step | None, m: int, depth: int, L: int):
    """What the engine's learned path submits before layer m (engine._on_block), from the trace."""
    T = st.idx[0].shape[0]
    raw = []
    for d in range(min(depth, learned.depth) + 1):
        j = m + d
        if j >= L:
            break
        p = prev.idx[j].view(prev.B, prev.S, -1)[:, -1] if prev is not None and prev.B == T else None
        raw.append((j, d, *learned.predict_topk(j, d, st.idx[m - 1] if m > 0 else None, p, T)))
    return to_predictions(raw)


def _recorded_predictions(st: Step, m: int, depth: int, L: int):
    """What the engine's lookahead path submits before layer m (engine._on_block): the recorded
    predictions for layers m .. m+depth made from the hidden state entering layer m, each expert
    with confidence 1 (the recorded ids only; the cost rule prices a prediction by its measured
    precision at its distance, not by its router weight)."""
    out = []
    for d in range(depth + 1):
        j = m + d
        if j >= L or d >= st.look[j].shape[1]:
            break
        ids = st.look[j][:, d].reshape(-1)
        ids = ids[ids >= 0]
        if ids.size:
            out.append((j, d, dict.fromkeys((int(e) for e in ids), 1.0)))  # first-seen order, like to_predictions
    return out


def _predictions(policy: str, st: Step, prev: Step | None, m: int, depth: int, L: int, learned, predictor: str):
    if policy in ("oracle", "belady-prefetch"):
        return [(j, j - m, {e: 1.0 for e in st.used[j]}) for j in range(m, min(L, m + depth + 1))]
    if policy == "predictive":
        return _recorded_predictions(st, m, depth, L) if predictor == "recorded" else \
            _learned_predictions(learned, st, prev, m, depth, L)
    if policy == "mixtral-offloading":  # the next layer only
        return [p for p in _learned_predictions(learned, st, prev, m, 1, L) if p[1] == 1]
    return []


def simulate(trace: RoutingTrace, policy: str, capacity: int, cal: Calibration, *, depth: int = 1,
             learned: LearnedPredictor | None = None, steps: list[Step] | None = None,
             cpu_experts: bool = False, stream_fraction: float = 0.75, max_inflight: int | None = None,
             profile: np.ndarray | None = None, memo: dict | None = None, predictor: str = "learned",
             split_s: float = 0.0) -> dict[str, Any]:
    """Replay `trace` with `capacity` slots: hits, copies, bytes, modelled stall and time (decode
    passes, one token per sequence, are also totalled apart: tokens/s and bytes/token). `steps`
    replays those passes instead of the whole trace; `profile` ([L, E], profile_of) is the hot-set
    peers' calibration (without one they profile the first pass, like the engine) and the
    predictive policy's prior. `memo`: a dict the caller keeps across calls that replay the same
    `steps` with the same `learned` predictor: each pass's predictions are computed once (they depend
    on neither the capacity nor the calibration). `predictor` (predictive): "learned" (`learned`, or
    one fitted on the trace itself) or "recorded" (the lookahead predictions recorded with the trace:
    the engine's default predictor). `split_s`: what a split run adds to its host and device parts
    (activation transfers and the host sync), paid by the planner's choice and by the timeline."""
    if policy == "default":  # the engine's default: a calibration window, the plan chosen on it, the rest
        return simulate_default(trace, capacity, cal, predictor=predictor, learned=learned, cpu_experts=cpu_experts,
                                depth=depth, split_s=split_s, stream_fraction=stream_fraction, max_inflight=max_inflight)
    if policy not in SIM_POLICIES:
        raise ValueError(f"policy={policy!r} is not one of {', '.join(SIM_POLICIES)}")
    if capacity < 1:
        raise ValueError(f"capacity={capacity} must be >= 1 slot")
    L, E = trace.num_layers, trace.num_experts
    steps = steps if steps is not None else steps_of(trace)
    if predictor not in ("learned", "recorded"):
        raise ValueError(f"predictor={predictor!r} is not one of learned, recorded")
    if predictor == "recorded":
        if trace.lookahead is None:
            raise ValueError("predictor='recorded' needs a trace recorded with its lookahead predictions "
                             "(TraceRecorder.attach(model, lookahead_depth=1)); use predictor='learned'")
        depth = min(depth, trace.lookahead.shape[1] - 1)
    if (policy == "mixtral-offloading" or (policy == "predictive" and predictor == "learned")) and learned is None:
        learned = LearnedPredictor.fit(trace, depth)
    scheme = "predictive" if policy == "oracle" else policy
    planner = Planner(ExpertCache(capacity, scheme), CostModel(cal), L,
                      scheme=SCHEMES[scheme], cpu_experts=cpu_experts, stream_fraction=stream_fraction,
                      num_experts=E, max_prefetch_per_layer=max_inflight or 2 * trace.top_k,
                      future=_future(steps, L) if SCHEMES[scheme].needs_future else None, profile=profile,
                      split_s=split_s)
    preloaded = len(planner.preload())  # every expert fits, or a profile: loaded before the first step, like the engine
    dec = {"time_s": 0.0, "stall_s": 0.0, "copies": 0, "tokens": 0, "passes": 0}
    copies, prev = 0, None
    kind = (f"{policy}-{predictor}" if policy in _LEARNED else "exact" if policy in ("oracle", "belady-prefetch")
            else None)
    for i, st in enumerate(steps):
        t0, s0, c0 = planner.now, planner.stall_s, copies
        for m in range(L):
            if kind is None:
                preds = []
            elif memo is None:
                preds = _predictions(policy, st, prev, m, depth, L, learned, predictor)
            else:
                k = (kind, depth, i, m)
                if k not in memo:
                    memo[k] = _predictions(policy, st, prev, m, depth, L, learned, predictor)
                preds = memo[k]
            copies += len(planner.prefetch(m, preds))
            copies += sum(op.kind == "copy" for op in planner.serve(m, st.used[m]).ops)
        copies += len(planner.end_pass())
        if st.S == 1:
            dec["time_s"] += planner.now - t0
            dec["stall_s"] += planner.stall_s - s0
            dec["copies"] += copies - c0
            dec["tokens"] += st.B
            dec["passes"] += 1
        prev = st
    t = planner.t
    uses = t.hits + t.misses
    dec["bytes_moved"] = dec["copies"] * cal.expert_bytes
    return {"policy": policy, "capacity": capacity, "cache_fraction": capacity / (L * E), "hits": t.hits,
            "misses": t.misses, "hit_rate": t.hits / uses if uses else None, "copies": copies,
            "bytes_moved": copies * cal.expert_bytes, "stall_s": planner.stall_s, "time_s": planner.now,
            "passes": len(steps), "prefetch_issued": t.prefetch_issued, "prefetch_used": t.prefetch_used,
            "prefetch_cancelled": t.prefetch_cancelled, "cpu_served": t.cpu_served, "split_runs": t.split_runs, "decode": dec,
            "parts": dict(planner.parts),
            "preload_copies": preloaded}


CHOICES = ("predictive", *PEERS, "lru", "lfu")
"""What the default planner chooses among per run (choose_policy): its own adaptive plan (host cores
on), every host-using peer's plan, and the plain LRU / LFU caches."""


def choose_policy(calib: RoutingTrace, capacity: int, cal: Calibration, *, candidates: tuple[str, ...] = CHOICES,
                  predictor: str = "learned", split_s: float = 0.0, depth: int = 1,
                  fit=None, cpu_experts: bool = True, stream_fraction: float = 0.75,
                  max_inflight: int | None = None) -> tuple[str, dict[str, float]]:
    """The planner's choice of plan for a run, from its calibration trace only: the calibration's first
    half profiles the hot sets (and fits the learned predictor, `fit(trace)`), each candidate is replayed
    with the simulator's own cost model on the calibration's second half, and the fastest (decode
    tokens per modelled second; ties: earlier in `candidates`) is the plan. Returns (its name,
    tokens/s per candidate). Every candidate sees only calibration tokens, never the ones it will serve.
    `cpu_experts`: whether the adaptive plan ("predictive") may use host cores (the peers always do,
    LRU / LFU never); the engine passes its own setting, its lookahead depth and its prefetch limit."""
    first, second = split_trace(calib)
    steps = steps_of(second)
    profile = profile_of(steps_of(first), calib.num_layers, calib.num_experts)
    learned = None
    if "predictive" in candidates and predictor == "learned":
        learned = fit(first) if fit is not None else LearnedPredictor.fit(first, depth)
    scores: dict[str, float] = {}
    memo: dict = {}
    for c in candidates:
        r = simulate(second, c, capacity, cal, depth=depth, learned=learned, steps=steps,
                     cpu_experts=cpu_experts and c == "predictive", profile=profile, memo=memo,
                     predictor=predictor if c == "predictive" else "learned", split_s=split_s,
                     stream_fraction=stream_fraction, max_inflight=max_inflight)
        d = r["decode"]
        scores[c] = d["tokens"] / d["time_s"] if d["time_s"] else 0.0
    best = max(candidates, key=lambda c: (scores[c], -candidates.index(c)))
    return best, scores


def plan_reason(chosen: str, scores: dict[str, float], where: str) -> str:
    """One line saying why `chosen` serves: its modelled tokens/s on `where` against the runner-up."""
    rest = sorted(((v, c) for c, v in scores.items() if c != chosen), reverse=True)
    runner = f"; next {rest[0][1]} {rest[0][0]:.2f}" if rest else ""
    return f"fastest replayed on {where}: {chosen} {scores[chosen]:.2f} tok/s (modelled){runner}"


def simulate_default(trace: RoutingTrace, capacity: int, cal: Calibration, *, calibration_tokens: int | None = None,
                     predictor: str = "learned", learned: LearnedPredictor | None = None, cpu_experts: bool = True,
                     depth: int = 1, split_s: float = 0.0, stream_fraction: float = 0.75,
                     max_inflight: int | None = None, fit=None) -> dict[str, Any]:
    """What the engine's policy="default" does on `trace` (offload/engine.py), counted whole:
    1. the calibration window, the first `calibration_tokens` decode passes (default
       calibration_passes of the trace's, any prefill before them included), runs the adaptive
       planner ("predictive", host cores per `cpu_experts`) and is counted;
    2. choose_policy on the window alone picks the plan (its first half profiles, its second half
       scores every candidate);
    3. the switch: a fresh planner of the chosen scheme, primed with the window's profile, loads its
       warm / pinned set (`switch_copies`, charged as link time the next step waits for);
    4. the rest of the trace runs the chosen plan.
    Returns the totals (hits, misses, copies, bytes_moved, time_s, decode like simulate) and the
    parts: window, after (what bench/cache_policies.py scores as its default row: the rest alone,
    its warm set loaded for free like every other policy's), chosen, calibration_tok_s, reason.
    A window under MIN_CALIBRATION decode passes, or one that leaves nothing after it, never
    switches: the whole trace runs the adaptive planner (chosen None). predictor="learned": `learned`
    is the engine's own predictor, used throughout; without one (a simulator-only case: the engine
    always has a predictor to record) `fit(trace)` (default LearnedPredictor.fit at `depth`) fits
    one on the window's first half for the window and the choice, and one on the whole window for
    the rest, as bench/cache_policies.py fits its calibration half."""
    L, E = trace.num_layers, trace.num_experts
    n = len(decode_steps(trace))
    K = calibration_tokens if calibration_tokens is not None else calibration_passes(max(n, 2))
    kw = dict(depth=depth, split_s=split_s, stream_fraction=stream_fraction, max_inflight=max_inflight)
    base = {"policy": "default", "capacity": capacity, "cache_fraction": capacity / (L * E), "calibration_tokens": K}
    if K < MIN_CALIBRATION or K >= n:
        r = simulate(trace, "predictive", capacity, cal, cpu_experts=cpu_experts, predictor=predictor, learned=learned, **kw)
        why = (f"a window of {K} decode steps is under {MIN_CALIBRATION}" if K < MIN_CALIBRATION
               else f"the run ({n} decode steps) ended within the {K}-step calibration window")
        return {**r, **base, "chosen": None, "calibration_tok_s": {}, "reason": f"no switch: {why}",
                "window": r, "after": None, "switch_copies": 0}
    window, rest = split_trace(trace, passes=K)
    later = learned
    if predictor == "learned" and learned is None:
        fit = fit or (lambda t: LearnedPredictor.fit(t, depth))
        learned = fit(split_trace(window)[0])
        later = fit(window)
    win = simulate(window, "predictive", capacity, cal, cpu_experts=cpu_experts, predictor=predictor, learned=learned, **kw)
    chosen, scores = choose_policy(window, capacity, cal, predictor=predictor, fit=lambda _t: learned,
                                   cpu_experts=cpu_experts, **kw)
    profile = profile_of(steps_of(window), L, E)
    after = simulate(rest, chosen, capacity, cal, cpu_experts=cpu_experts and chosen == "predictive", profile=profile,
                     predictor=predictor if chosen == "predictive" else "learned",
                     learned=later if chosen == "predictive" else None, **kw)
    switch = after["preload_copies"]
    out = {k: win[k] + after[k] for k in ("hits", "misses", "copies", "stall_s", "time_s", "passes", "prefetch_issued",
                                          "prefetch_used", "prefetch_cancelled", "cpu_served", "split_runs")}
    out["copies"] += switch
    out["time_s"] += switch * cal.copy_s
    out["bytes_moved"] = out["copies"] * cal.expert_bytes
    uses = out["hits"] + out["misses"]
    out["hit_rate"] = out["hits"] / uses if uses else None
    dec = {k: win["decode"][k] + after["decode"][k] for k in ("time_s", "stall_s", "copies", "tokens", "passes")}
    dec["copies"] += switch
    dec["time_s"] += switch * cal.copy_s
    dec["bytes_moved"] = dec["copies"] * cal.expert_bytes
    return {**out, **base, "decode": dec, "chosen": chosen, "calibration_tok_s": scores,
            "reason": plan_reason(chosen, scores, f"the second half of the first {K} decode steps"),
            "window": win, "after": after, "switch_copies": switch, "preload_copies": win["preload_copies"]}


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


def simulate_grid(trace: RoutingTrace, policies: list[str], capacities: list[int], cal: Calibration, *,
                  depth: int = 1, **kw) -> list[dict[str, Any]]:
    steps = steps_of(trace)
    learned = LearnedPredictor.fit(trace, depth) if any(p in _LEARNED for p in policies) else None
    # default: its window fits its own predictor (or replays the recorded lookahead), never this in-sample one
    return [simulate(trace, p, c, cal, depth=depth, learned=None if p == "default" else learned,
                     steps=None if p == "default" else steps,
                     **({"predictor": "recorded"} if p == "default" and trace.lookahead is not None else {}), **kw)
            for c in capacities for p in policies]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'policy':>18} {'slots':>6} {'cache':>6} {'hit rate':>9} {'MiB moved':>10} {'stall ms':>9} {'time ms':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        hr = "n/a" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        lines.append(f"{r['policy']:>18} {r['capacity']:>6} {r['cache_fraction']:>6.0%} {hr:>9} "
                     f"{r['bytes_moved'] / 2**20:>10.2f} {r['stall_s'] * 1e3:>9.2f} {r['time_s'] * 1e3:>9.2f}")
    return "\n".join(lines)


__all__ = ["Step", "steps_of", "profile_of", "split_trace", "simulate", "choose_policy", "CHOICES", "simulate_default",
           "calibration_passes", "decode_steps", "plan_reason", "CALIBRATION_SHARE", "MIN_CALIBRATION", "simulate_grid", "trace_timing", "parse_capacities", "format_table",
           "SIM_POLICIES"]
