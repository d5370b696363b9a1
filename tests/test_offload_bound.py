"""offload/bound.py: the upper bound on any planner's tokens/s is above every policy the simulator runs
(its time below theirs), exact where nothing is left to decide, and its interval packing is optimal."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from moe_runtime.offload.bound import _uses, max_kept, upper_bound
from moe_runtime.offload.cpu_experts import Calibration
from moe_runtime.offload.plan import PEERS
from moe_runtime.offload.simulate import profile_of, simulate, split_trace, steps_of
from moe_runtime.offload.synthetic import synthetic_trace


def _cal(copy_s: float, host_s: float, attn_s: float = 3e-4) -> Calibration:
    return Calibration(device="cpu", expert_bytes=1, copy_s=copy_s, tokens=(1, 64), host_s=(host_s, 64 * host_s),
                       device_s=(1e-4, 1e-3), act_s_per_token=0.0, attn_s=attn_s)


@pytest.mark.parametrize("copy_s,host_s,batch", [(1e-3, 1.5e-3, 1), (2e-3, 0.5e-3, 3), (0.2e-3, 3e-3, 1)])
def test_no_policy_beats_the_bound(copy_s, host_s, batch):
    trace = synthetic_trace(num_layers=3, num_experts=8, top_k=2, tokens=24, batch=batch, zipf=1.0,
                            locality=0.3, transition=0.2, seed=batch)
    calib, held = split_trace(trace)
    steps = steps_of(held)
    profile = profile_of(steps_of(calib), 3, 8)
    cal = _cal(copy_s, host_s)
    for cap in (1, 4, 12):
        b = upper_bound(steps, 3, cap, cal)
        for policy, cpu in [("lru", False), ("oracle", True), ("oracle", False), ("belady", False),
                            ("belady-prefetch", False), *((p, False) for p in PEERS)]:
            # oracle: the planner with host cores and exact predictions (no predictor to fit)
            r = simulate(held, policy, cap, cal, steps=steps, cpu_experts=cpu, profile=profile, split_s=1e-5)
            assert b["time_s"] <= r["decode"]["time_s"] * (1 + 1e-9), (policy, cap, b, r["decode"])
        assert b["tokens"] == r["decode"]["tokens"]


def test_the_bound_is_near_exact_when_every_expert_fits():
    """All experts in slots: every use is a hit, the time is attention plus device runs; the bound
    is below it only by what sharing each run between device and host cores (a split) could save."""
    trace = synthetic_trace(num_layers=2, num_experts=4, top_k=2, tokens=10, seed=0)
    steps = steps_of(trace)
    cal = _cal(1e-3, 1.5e-3)
    b = upper_bound(steps, 2, 8, cal)
    r = simulate(trace, "lru", 8, cal, steps=steps)
    assert 0.95 * r["decode"]["time_s"] <= b["time_s"] <= r["decode"]["time_s"]


def _brute_kept(uses, S: int) -> int:
    """Most kept intervals by trying every subset (tiny cases): at most S alive at each boundary."""
    ivs = []  # (first boundary, last boundary) an interval occupies; warm ones start at -1
    last: dict = {}
    for pos, key, _ in uses:
        ivs.append((last.get(key, -1), pos - 1))
        last[key] = pos
    best = 0
    for mask in itertools.product((0, 1), repeat=len(ivs)):
        load: dict[int, int] = {}
        for keep, (a, b) in zip(mask, ivs):
            if keep:
                for t in range(a, b + 1):
                    load[t] = load.get(t, 0) + 1
        if all(v <= S for v in load.values()):
            best = max(best, sum(mask))
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("S", [1, 2, 3])
def test_interval_packing_is_optimal(seed, S):
    trace = synthetic_trace(num_layers=2, num_experts=4, top_k=2, tokens=3, seed=seed, zipf=0.5)
    uses, _ = _uses(steps_of(trace), 2)
    assert max_kept(uses, np.ones(len(uses), dtype=bool), S) == _brute_kept(uses, S)
