"""Issue 19: what a projection replays. The engine's default predictor (lookahead gating) recorded
with the routing and replayed by the simulator makes the engine's decisions; a split run's
transfers and sync are paid; the default plan is chosen from the calibration half only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_runtime.offload.cpu_experts import Calibration
from moe_runtime.offload.engine import ExpertCacheEngine
from moe_runtime.offload.simulate import CHOICES, choose_policy, simulate, split_trace, steps_of
from moe_runtime.offload.synthetic import synthetic_trace
from moe_runtime.offload.trace import RoutingTrace, TraceError, TraceRecorder
from tests.test_offload_support import single_thread, tiny_cfg, twin_models  # noqa: F401

NEW = 24


def _cal(copy_s=1e-3, host_s=1.5e-3, attn_s=3e-4, expert_bytes=3 * 32 * 24 * 4) -> Calibration:
    return Calibration(device="cpu", expert_bytes=expert_bytes, copy_s=copy_s, tokens=(1, 64),
                       host_s=(host_s, 64 * host_s), device_s=(1e-4, 1e-3), act_s_per_token=0.0, attn_s=attn_s)


@pytest.fixture(scope="module")
def looked():
    """A sampled generation of the resident model recorded with its lookahead predictions, and the
    twin model for the engine."""
    resident, offloaded = twin_models(tiny_cfg())
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    rec = TraceRecorder(3, 8, 2).attach(resident, lookahead_depth=1)
    with torch.no_grad():
        resident.generate(prompt, NEW, temperature=0.8, generator=torch.Generator().manual_seed(0))
    rec.detach()
    return rec.to_trace(), offloaded, prompt


def test_lookahead_column_round_trips_and_is_checked(looked, tmp_path):
    trace = looked[0]
    assert trace.lookahead is not None and trace.lookahead.shape == (len(trace), 2, 2)
    assert (trace.lookahead[trace.layer == 0, 1] == -1).all(), "layer 0 has no distance-1 prediction"
    assert (trace.lookahead[:, 0] >= 0).all(), "every layer gets a distance-0 prediction"
    back = RoutingTrace.load(trace.save(tmp_path / "t.trace"))
    assert np.array_equal(back.lookahead, trace.lookahead) and back.meta["lookahead_depth"] == 1
    d = trace.to_dict()
    d["lookahead"] = d["lookahead"][:-2]
    with pytest.raises(TraceError, match="lookahead"):
        RoutingTrace.from_dict(d)
    with pytest.raises(ValueError, match="lookahead"):
        simulate(synthetic_trace(num_layers=3, num_experts=8, top_k=2, tokens=4, seed=0), "predictive", 4, _cal(),
                 predictor="recorded")


@pytest.mark.parametrize("cpu_experts", [False, True])
def test_engine_equals_simulator_replaying_recorded_lookahead(looked, cpu_experts):
    """The engine's default predictor (auto = lookahead for a post-attention router) against the
    simulator replaying the recorded lookahead: the same hits, misses, host runs, splits and bytes."""
    trace, model, prompt = looked
    cal = _cal()
    for slots in (3, 6, 12):
        engine = ExpertCacheEngine(model, gpu_expert_slots=slots, policy="predictive", device="cpu", calibration=cal,
                                   keep_banks=True, cpu_experts=cpu_experts, record_trace=True)
        engine.generate(prompt, NEW, temperature=0.8, generator=torch.Generator().manual_seed(0))
        assert engine.predictor_name == "lookahead"
        assert np.array_equal(engine.trace().experts, trace.experts), "the engine must route as the resident model"
        c = engine.runtime.c
        sim = simulate(trace, "predictive", slots, cal, cpu_experts=cpu_experts, predictor="recorded")
        got = (c.hits, c.misses, c.cpu_served, c.split_runs, c.prefetch_issued, engine.copies.bytes_moved)
        want = (sim["hits"], sim["misses"], sim["cpu_served"], sim["split_runs"], sim["prefetch_issued"],
                sim["bytes_moved"])
        assert got == want, (slots, cpu_experts)
        engine.close()


def test_split_runs_pay_their_transfers_and_sync():
    trace = synthetic_trace(num_layers=4, num_experts=16, top_k=2, tokens=40, locality=0.0, seed=1)
    cal = _cal(copy_s=1e-3, host_s=1.5e-3)
    free = simulate(trace, "predictive", 16, cal, cpu_experts=True, split_s=0.0)
    assert free["split_runs"] > 0
    dear = simulate(trace, "predictive", 16, cal, cpu_experts=True, split_s=1e-3)
    assert dear["split_runs"] == 0, "a split that saves less than its transfers is not taken"
    some = simulate(trace, "predictive", 16, cal, cpu_experts=True, split_s=2e-5)
    assert some["time_s"] > free["time_s"]
    with pytest.raises(ValueError, match="split_s"):
        simulate(trace, "predictive", 16, cal, cpu_experts=True, split_s=-1.0)


def test_default_plan_is_chosen_from_the_calibration_half_only():
    """The choice is the best calibration score, and changing the evaluation half changes nothing."""
    trace = synthetic_trace(num_layers=4, num_experts=16, top_k=2, tokens=48, zipf=1.4, transition=0.2, seed=3)
    calib, held = split_trace(trace)
    cal = _cal()
    best, scores = choose_policy(calib, 16, cal)
    assert set(scores) == set(CHOICES) and scores[best] == max(scores.values())
    other = synthetic_trace(num_layers=4, num_experts=16, top_k=2, tokens=48, locality=0.9, seed=9)
    mixed = RoutingTrace(4, 16, 2, *(np.concatenate([getattr(calib, k), getattr(split_trace(other)[1], k)])
                                     for k in ("step", "seq", "pos", "layer", "experts", "scores")))
    assert choose_policy(split_trace(mixed)[0], 16, cal) == (best, scores)
