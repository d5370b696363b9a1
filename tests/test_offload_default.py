"""Issue 19: the engine runs the default plan the simulator projects. policy="default": a calibration
window run by the adaptive planner and recorded, simulate.choose_policy on it with the engine's
constants, the switch to the chosen plan primed with the window's profile; or the choice made up
front on a profile trace. Engine == simulator (choice, counts, bytes), tokens == resident."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from moe_runtime.offload.config import OffloadConfig
from moe_runtime.offload.cpu_experts import Calibration
from moe_runtime.offload.engine import ExpertCacheEngine
from moe_runtime.offload.report import summary_lines
from moe_runtime.offload.simulate import (CHOICES, calibration_passes, choose_policy, profile_of, simulate,
                                          simulate_default, split_trace, steps_of)
from moe_runtime.offload.synthetic import synthetic_trace
from moe_runtime.offload.trace import TraceRecorder
from tests.test_offload_replay import _cal
from tests.test_offload_support import single_thread, tiny_cfg, twin_models  # noqa: F401

NEW = 24
CALS = {"balanced": _cal(), "fast host": _cal(copy_s=2e-3, host_s=2e-4), "slow host": _cal(copy_s=2e-4, host_s=5e-3)}


def _generate(model, prompt, seed: int):
    return model.generate(prompt, NEW, temperature=0.8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def runs():
    """Two sampled generations of the resident model recorded with their lookahead predictions
    (the engine's default predictor), their tokens, and the twin model for the engine."""
    resident, offloaded = twin_models(tiny_cfg())
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    out = {}
    for seed in (0, 1):
        rec = TraceRecorder(3, 8, 2).attach(resident, lookahead_depth=1)
        with torch.no_grad():
            tokens = _generate(resident, prompt, seed)
        rec.detach()
        out[seed] = (rec.to_trace(), tokens)
    return out, offloaded, prompt


def _counts(engine):
    c = engine.runtime.c
    return {"hits": c.hits, "misses": c.misses, "cpu_served": c.cpu_served, "split_runs": c.split_runs,
            "prefetch_issued": c.prefetch_issued, "bytes_moved": engine.copies.bytes_moved}


def test_engine_default_equals_simulator(runs):
    """The engine's window, its choice (with every candidate's score), the switch and the rest are
    the simulator's simulate_default, count for count; the tokens are the resident model's."""
    (by_seed, model, prompt) = runs
    trace, tokens = by_seed[0]
    chosen = set()
    for name, cal in CALS.items():
        for slots, cpu in ((3, False), (6, True), (12, True)):
            engine = ExpertCacheEngine(model, gpu_expert_slots=slots, device="cpu", calibration=cal, keep_banks=True,
                                       cpu_experts=cpu, record_trace=True)
            assert engine.policy == "default" and engine.predictor_name == "lookahead"
            res = engine.generate(prompt, NEW, temperature=0.8, generator=torch.Generator().manual_seed(0))
            assert torch.equal(res.tokens, tokens), "tokens must be the resident model's"
            assert np.array_equal(engine.trace().experts, trace.experts)
            sim = simulate_default(trace, slots, cal, predictor="recorded", cpu_experts=cpu)
            plan = res.report["plan"]
            where = (name, slots, cpu)
            assert plan["state"] == "chosen" and plan["calibration_tokens"] == calibration_passes(NEW - 1) == 12, where
            assert (plan["chosen"], plan["calibration_tok_s"]) == (sim["chosen"], sim["calibration_tok_s"]), where
            assert set(plan["calibration_tok_s"]) == set(CHOICES) and plan["chosen"] in plan["reason"]
            assert plan["switch_copies"] == sim["switch_copies"] > 0, where
            win = sim["window"]
            keys = ("hits", "misses", "cpu_served", "split_runs", "prefetch_issued", "prefetch_used", "bytes_moved")
            assert {k: plan["window"][k] for k in keys} == {k: win[k] for k in keys}, where
            assert _counts(engine) == {k: sim[k] for k in _counts(engine)}, where
            engine.runtime.cache.check_invariants()
            chosen.add(plan["chosen"])
            engine.close()
    assert len(chosen) >= 2, f"the calibrations must drive more than one choice to test the switch (got {chosen})"


def test_a_profile_trace_chooses_up_front(runs):
    """OffloadConfig(profile=trace): the bench's default row exactly: chosen on the profile trace,
    the run served by that plan primed with its profile, from the first step (no window)."""
    (by_seed, model, prompt) = runs
    calib, _ = by_seed[1]
    trace, tokens = by_seed[0]
    for name, cal in CALS.items():
        slots, cpu = 6, True
        engine = ExpertCacheEngine(model, OffloadConfig(gpu_expert_slots=slots, device="cpu", cpu_experts=cpu,
                                                        profile=calib), calibration=cal, keep_banks=True)
        res = engine.generate(prompt, NEW, temperature=0.8, generator=torch.Generator().manual_seed(0))
        assert torch.equal(res.tokens, tokens)
        best, scores = choose_policy(calib, slots, cal, predictor="recorded", cpu_experts=cpu)
        plan = engine.plan
        assert (plan["state"], plan["chosen"], plan["calibration_tok_s"]) == ("chosen", best, scores), name
        sim = simulate(trace, best, slots, cal, cpu_experts=cpu and best == "predictive",
                       profile=profile_of(steps_of(calib), 3, 8), predictor="recorded" if best == "predictive" else "learned")
        assert _counts(engine) == {k: sim[k] for k in _counts(engine)}, name
        engine.close()


def test_simulate_default_scores_what_the_bench_scores():
    """The bench scores the default row on the held-out half alone: simulate_default's `after` is
    that row (same choice, counts and time), and its totals add the window and the switch."""
    trace = synthetic_trace(num_layers=4, num_experts=16, top_k=2, tokens=48, zipf=1.4, transition=0.2, seed=3)
    cal = _cal()
    for cpu in (False, True):
        d = simulate_default(trace, 16, cal, cpu_experts=cpu)
        calib, held = split_trace(trace)
        best, scores = choose_policy(calib, 16, cal, cpu_experts=cpu)
        bench = simulate(held, best, 16, cal, cpu_experts=cpu and best == "predictive",
                         profile=profile_of(steps_of(calib), 4, 16), learned=LearnedPredictor_fit(calib))
        assert (d["chosen"], d["calibration_tok_s"]) == (best, scores)
        for k in ("hits", "misses", "copies", "cpu_served", "time_s"):
            assert d["after"][k] == bench[k], k
        assert d["copies"] == d["window"]["copies"] + d["switch_copies"] + bench["copies"]
        assert d["time_s"] == pytest.approx(d["window"]["time_s"] + d["switch_copies"] * cal.copy_s + bench["time_s"])
        assert simulate(trace, "default", 16, cal, cpu_experts=cpu)["chosen"] == best


def LearnedPredictor_fit(trace):  # noqa: N802 - the fit simulate_default uses by default
    from moe_runtime.offload.predictor import LearnedPredictor
    return LearnedPredictor.fit(trace, 1)


def test_short_runs_and_bad_settings(runs):
    (by_seed, model, prompt) = runs
    engine = ExpertCacheEngine(model, gpu_expert_slots=6, device="cpu", calibration=_cal(), keep_banks=True)
    res = engine.generate(prompt, 3)
    assert res.report["plan"]["state"] == "fixed" and "under 2" in res.report["plan"]["reason"]
    engine.close()
    # a window longer than the run: still calibrating, the adaptive planner served it (as simulate_default says)
    engine = ExpertCacheEngine(model, OffloadConfig(gpu_expert_slots=6, device="cpu", calibration_tokens=40,
                                                    record_trace=True), calibration=_cal(), keep_banks=True)
    res = engine.generate(prompt, NEW)
    assert res.report["plan"]["state"] == "calibrating" and "calibrating" in summary_lines(res.report)[-1]
    assert simulate_default(engine.trace(), 6, _cal(), calibration_tokens=40, predictor="learned")["chosen"] is None
    engine.close()
    engine = ExpertCacheEngine(model, gpu_expert_slots=24, device="cpu", calibration=_cal(), keep_banks=True)
    assert engine.plan["state"] == "resident"
    engine.close()
    for kw, msg in ((dict(calibration_tokens=1), "calibration_tokens"),
                    (dict(calibration_tokens=8, policy="lru"), "policy='default' only"),
                    (dict(profile=np.zeros((3, 8))), "RoutingTrace")):
        with pytest.raises(ValueError, match=msg):
            OffloadConfig(gpu_expert_slots=6, **kw)
    assert OffloadConfig(gpu_expert_slots=6).policy == "default"


def test_cli_flags_reach_the_engine(runs, tmp_path):
    from moe_runtime.offload.generate_cli import add_policy_args, policy_settings
    (by_seed, model, prompt) = runs
    path = by_seed[1][0].save(tmp_path / "calib.trace")
    p = argparse.ArgumentParser()
    add_policy_args(p)
    kw = policy_settings(p.parse_args(["--profile", str(path)]))
    assert kw["policy"] == "default" and len(kw["profile"]) == len(by_seed[1][0])
    assert policy_settings(p.parse_args(["--calibration-tokens", "5"]))["calibration_tokens"] == 5
    with pytest.raises(SystemExit):
        p.parse_args(["--policy", "nope"])
    # `moe trace simulate --policies default` projects what the engine runs (recorded lookahead replayed)
    from moe_runtime.core.cli import main
    out = tmp_path / "sim.json"
    assert main(["trace", "simulate", str(path), "--policies", "default,lru", "--capacities", "6", "--copy-ms", "1",
                 "--attn-ms", "0.3", "--expert-ms", "0.1", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    cal = Calibration(device="given", expert_bytes=0, copy_s=1e-3, tokens=(1,), host_s=(1.0,), device_s=(1e-4,),
                      act_s_per_token=0.0, attn_s=3e-4)
    want = simulate_default(by_seed[1][0], 6, cal, predictor="recorded", cpu_experts=False)
    assert (row["policy"], row["chosen"], row["hits"], row["misses"]) == ("default", want["chosen"], want["hits"],
                                                                          want["misses"])
