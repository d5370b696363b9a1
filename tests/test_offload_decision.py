"""The transfer decisions (offload/decision.py): the engine and the simulator make the same ones;
prefetch only when it pays; stale prefetches are cancelled; eviction knows the layer cycle.
Also the synthetic traces and the projection constants the benchmark relies on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_runtime.offload.cache import ExpertCache
from moe_runtime.offload.cpu_experts import Calibration, CostModel
from moe_runtime.offload.decision import Planner
from moe_runtime.offload.engine import ExpertCacheEngine
from moe_runtime.offload.predictor import LearnedPredictor
from moe_runtime.offload.projection import constants, project, projection_calibration
from moe_runtime.offload.simulate import simulate, steps_of
from moe_runtime.offload.synthetic import synthetic_trace
from tests.test_offload_support import single_thread, tiny_cfg, twin_models  # noqa: F401

NEW = 24
ENGINE_POLICIES = ("lru", "lfu", "predictive", "mixtral-offloading", "moe-infinity")


def _cal(copy_s: float, attn_s: float, expert_bytes: int = 1) -> Calibration:
    return Calibration(device="cpu", expert_bytes=expert_bytes, copy_s=copy_s, tokens=(1, 64), host_s=(1.0, 64.0),
                       device_s=(1e-4, 1e-3), act_s_per_token=0.0, attn_s=attn_s)


@pytest.fixture(scope="module")
def recorded():
    """One sampled generation recorded at full capacity, the model back, and a predictor fitted on it."""
    _, model = twin_models(tiny_cfg())
    expert_bytes = 3 * 32 * 24 * 4
    cal = _cal(1e-3, 3e-4, expert_bytes)
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    engine = ExpertCacheEngine(model, gpu_expert_slots=24, policy="lru", device="cpu", record_trace=True,
                               calibration=cal, keep_banks=True)
    engine.generate(prompt, NEW, temperature=0.8, generator=torch.Generator().manual_seed(0))
    trace = engine.trace()
    return engine.close(), trace, LearnedPredictor.fit(trace, 1, steps=50), cal, prompt


@pytest.mark.parametrize("policy", ENGINE_POLICIES)
def test_engine_equals_simulator_on_a_recorded_trace(recorded, policy):
    """Hits, misses, copies and bytes of the engine equal the simulator's, every capacity (1 slot,
    fewer than a pass, all experts)."""
    model, trace, learned, cal, prompt = recorded
    steps = steps_of(trace)
    predictor = learned if policy in ("predictive", "mixtral-offloading") else "auto"
    for slots in (1, 3, 6, 12, 24):
        engine = ExpertCacheEngine(model, gpu_expert_slots=slots, policy=policy, device="cpu", calibration=cal,
                                   keep_banks=True, predictor=predictor)
        engine.generate(prompt, NEW, temperature=0.8, generator=torch.Generator().manual_seed(0))
        c = engine.runtime.c
        sim = simulate(trace, policy, slots, cal, learned=learned, steps=steps)
        got = {"hits": c.hits, "misses": c.misses, "bytes_moved": engine.copies.bytes_moved,
               "prefetch_issued": c.prefetch_issued}
        want = {k: sim[k] for k in got}
        assert got == want, f"{policy} at {slots} slots: engine {got} != simulator {want}"
        assert sim["bytes_moved"] == sim["copies"] * cal.expert_bytes
        engine.close()


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_engine_equals_simulator_with_host_experts(recorded, policy):
    """Host cores at 1.5 copies per expert: a miss queued behind one copy runs on the host instead."""
    model, trace, learned, cal, prompt = recorded
    host = Calibration(device="cpu", expert_bytes=cal.expert_bytes, copy_s=1e-3, tokens=(1, 64),
                       host_s=(1.5e-3, 96e-3), device_s=(1e-4, 1e-3), act_s_per_token=0.0, attn_s=3e-4)
    for slots in (3, 12):
        engine = ExpertCacheEngine(model, gpu_expert_slots=slots, policy=policy, device="cpu", calibration=host,
                                   keep_banks=True, cpu_experts=True, predictor=learned if policy == "predictive" else "auto")
        engine.generate(prompt, NEW, temperature=0.8, generator=torch.Generator().manual_seed(0))
        c = engine.runtime.c
        sim = simulate(trace, policy, slots, host, learned=learned, cpu_experts=True)
        got = (c.hits, c.misses, c.cpu_served, c.split_runs, engine.copies.bytes_moved, engine.copies.copies)
        want = (sim["hits"], sim["misses"], sim["cpu_served"], sim["split_runs"], sim["bytes_moved"], sim["copies"])
        assert got == want, (policy, slots)
        assert c.cpu_served > 0 and c.split_runs > 0
        engine.close()


def _warm(planner: Planner, layers: int, k: int = 2) -> None:
    """Serve `layers` layers, each routing one token to k random experts (no temporal locality)."""
    rng = np.random.default_rng(0)
    for i in range(layers):
        m = i % planner.L
        planner.prefetch(m)
        planner.serve(m, {int(e): 1 for e in rng.choice(planner.E, k, replace=False)})
        if m == planner.L - 1:
            planner.end_pass()


def test_demand_miss_is_preferred_to_a_speculative_prefetch_when_the_link_is_the_bottleneck():
    def planner(copy_s: float) -> Planner:
        p = Planner(ExpertCache(4, "lru"), CostModel(_cal(copy_s, 3e-4)), 4, scheme="predictive", num_experts=8)
        _warm(p, 8)
        return p

    slow = planner(10e-3)  # a copy is 33 attention windows: every layer's link time is demand misses'
    assert slow.copies_per_layer * slow.copy_s > 10 * slow.attn_s, "the link carries more than the compute hides"
    ops = slow.prefetch(0, [(0, 0, {7: 0.9})])
    assert (0, 7) not in [op.key for op in ops], "a 50%-calibrated guess would take link time from demand misses"
    plan = slow.serve(0, {7: 1})
    assert [op.kind for op in plan.ops] == ["copy", "run"], "the demand miss is copied at once"
    fast = planner(1e-4)  # a copy hides in one attention window: the same guess pays
    assert (0, 7) in [op.key for op in fast.prefetch(0, [(0, 0, {7: 0.9})])]


def test_a_prefetch_past_its_deadline_is_cancelled():
    p = Planner(ExpertCache(4, "lru"), CostModel(_cal(10e-3, 3e-4)), 4, scheme="predictive", num_experts=8)
    _warm(p, 8)
    assert (1, 7) not in [op.key for op in p.prefetch(0, [(1, 1, {7: 0.9})])] and (1, 7) in p.queue.pending
    p.serve(0, {3: 1})
    p.prefetch(1)
    before = p.t.prefetch_cancelled
    p.serve(1, {2: 1})
    assert p.t.prefetch_cancelled == before + 1 and (1, 7) not in p.queue.pending
    assert (1, 7) not in p.cache, "a request whose layer ran is never issued"


@pytest.mark.parametrize("policy", ["predictive", "belady"])
def test_layer_cycle_eviction_does_not_collapse_below_one_pass(policy):
    """Every token uses the same 2 experts in each of 8 layers (16 keys a pass) with 12 slots: LRU
    evicts each key just before its reuse (0 hits); evicting the layer just run keeps 11 of 16."""
    trace = synthetic_trace(num_layers=8, num_experts=8, top_k=2, tokens=40, locality=1.0, seed=3)
    cal = _cal(1e-3, 3e-4)
    lru = simulate(trace, "lru", 12, cal)
    got = simulate(trace, policy, 12, cal, learned=LearnedPredictor.fit(trace, 1, steps=20))
    assert lru["hits"] == 0
    assert got["hit_rate"] > 0.55, got
    assert got["decode"]["time_s"] < lru["decode"]["time_s"]


def test_synthetic_traces_are_seeded_and_have_the_asked_locality():
    kw = dict(num_layers=4, num_experts=16, top_k=2, tokens=200, batch=2)
    a, b = synthetic_trace(**kw, locality=0.9, seed=5), synthetic_trace(**kw, locality=0.9, seed=5)
    assert np.array_equal(a.experts, b.experts) and len(a) == 200 * 4 * 2
    assert all(len(set(row)) == 2 for row in a.experts.tolist()), "top-k experts are distinct"

    def reuse(t) -> float:  # share of picks equal to the previous token's at the same layer
        choices, prev, _ = t.token_table()
        ok = prev >= 0
        same = (choices[ok][:, :, :, None] == choices[prev[ok]][:, :, None, :]).any(-1)
        return float(same.float().mean())

    assert reuse(a) > 0.85 and reuse(synthetic_trace(**kw, locality=0.0, seed=5)) < 0.4
    with pytest.raises(ValueError, match="must be >= 0 with a sum <= 1"):
        synthetic_trace(**kw, locality=0.8, transition=0.5)


def test_projection_constants_and_scaling():
    c = constants("mixtral-8x7b", "h100-pcie5")
    assert c["expert_mb"] == pytest.approx(352.3, abs=0.1) and c["copy_ms"] == pytest.approx(6.43, abs=0.01)
    assert projection_calibration("qwen3-30b-a3b", "pcie4").expert_bytes == 3 * 2048 * 768 * 2
    row = {"decode": {"tokens": 10, "time_s": 1.0, "bytes_moved": 100, "stall_s": 0.5, "copies": 4}}
    p = project(row, trace_layers=8, shape="mixtral-8x7b")  # 32 layers: 4x the trace's 8
    assert p["tokens_per_s"] == pytest.approx(2.5) and p["bytes_per_token"] == pytest.approx(40)
    with pytest.raises(ValueError, match="--link 'pcie9' is not one of h100-pcie5, pcie4"):
        projection_calibration("mixtral-8x7b", "pcie9")


def test_recency_boost_is_calibrated_from_the_routing():
    """The boost is ~1 when layers reuse last run's experts and ~0 when routing is independent."""
    from moe_runtime.offload.eviction import UsageStats
    rng = np.random.default_rng(0)
    repeat, iid = UsageStats(2, 8), UsageStats(2, 8)
    for _ in range(300):
        for m in range(2):
            repeat.observe(m, [1, 2 + m])
            iid.observe(m, sorted(int(e) for e in rng.choice(8, 2, replace=False)))
    assert repeat.boost > 0.9 and abs(iid.boost) < 0.1
    assert repeat.p_use((0, 1)) > 0.95 and repeat.p_use((0, 5)) < 0.05
    cm = CostModel(_cal(0.5, 0.0))  # copy 0.5 s beats host 1.0 s, unless 5 s of copies are queued
    assert cm.decide(1, None, True, queued_s=0.0) == "copy" and cm.decide(1, None, True, queued_s=5.0) == "cpu"


def test_the_link_prefetches_the_next_layer_while_host_cores_run_a_miss():
    """Host cores at half a copy: layer 0's new expert runs on the host, and during that run the
    otherwise idle link brings the expert layer 1 used every pass (it is then a hit); without host
    cores the step copies its miss and prefetches nothing."""
    def planner(cpu: bool) -> Planner:
        cal = Calibration(device="cpu", expert_bytes=1, copy_s=10e-3, tokens=(1, 64), host_s=(5e-3, 320e-3),
                          device_s=(1e-4, 1e-3), act_s_per_token=0.0, attn_s=3e-4)
        p = Planner(ExpertCache(3, "lru"), CostModel(cal), 4, scheme="predictive", num_experts=8, cpu_experts=cpu)
        for _ in range(6):  # every pass, layer m uses expert m: 4 keys, 3 slots
            for m in range(4):
                p.prefetch(m)
                p.serve(m, {m: 1})
            p.end_pass()
        p.prefetch(0)
        return p

    p = planner(True)
    assert (1, 1) not in p.cache, "the layer-cycle rule evicted the key needed soonest after this pass's end"
    issued = p.t.prefetch_issued
    plan = p.serve(0, {5: 1})
    assert [(op.kind, op.key) for op in plan.ops] == [("copy", (1, 1)), ("cpu", (0, 5))]
    assert p.t.prefetch_issued == issued + 1
    p.prefetch(1)
    assert [op.kind for op in p.serve(1, {1: 1}).ops] == ["run"], "the prefetched expert is a hit"
    q = planner(False)
    assert all(op.key[0] == 0 for op in q.serve(0, {5: 1}).ops), "no host run: no idle link to fill"


def test_this_token_bounds_see_only_the_current_pass():
    """Belady limited to the rest of the current pass: on routing that repeats every pass, LRU
    evicts each key just before its reuse; seeing this pass keeps the keys still due in it
    (hits > 0), seeing later passes (Belady) keeps more; with no reuse inside a pass (one layer)
    the bound is exactly its fallback."""
    cal = _cal(1e-3, 3e-4)
    cycle = synthetic_trace(num_layers=8, num_experts=8, top_k=2, tokens=40, locality=1.0, seed=3)
    hits = {p: simulate(cycle, p, 12, cal)["hits"] for p in ("lru", "this-token-lru", "belady")}
    assert hits["lru"] == 0 < hits["this-token-lru"] < hits["belady"], hits
    one = synthetic_trace(num_layers=1, num_experts=16, top_k=2, tokens=60, zipf=1.2, seed=4)
    for fallback in ("lru", "lfu"):
        assert simulate(one, f"this-token-{fallback}", 5, cal)["hits"] == simulate(one, fallback, 5, cal)["hits"]
    with pytest.raises(ValueError, match="needs the future"):
        Planner(ExpertCache(4, "lru"), CostModel(cal), 2, scheme="this-token-lru", num_experts=4)


def test_a_split_run_lands_when_its_host_share_is_done():
    """One miss, host cores idle: host cores take r of W13's rows so that they finish when the
    rest of the expert lands (r W H = (1 - r W) C), which is sooner than copying it whole; the
    fill then moves W13's first rows behind it, and the next use is a hit that waits for it."""
    C, H = 6e-3, 8e-3
    cal = Calibration(device="cpu", expert_bytes=1, copy_s=C, tokens=(1, 64), host_s=(H, 64 * H),
                      device_s=(1e-4, 64e-4), act_s_per_token=0.0, attn_s=3e-4)
    p = Planner(ExpertCache(4, "lru"), CostModel(cal), 2, scheme="lru", num_experts=4, cpu_experts=True)
    p.prefetch(0)
    plan = p.serve(0, {1: 1})
    kinds = [(op.kind, op.key) for op in plan.ops]
    assert kinds == [("copy", (0, 1)), ("split", (0, 1)), ("fill", (0, 1))], kinds
    r = plan.ops[0].host_share
    w = 2 / 3  # W13's share of a SwiGLU expert's bytes
    assert r == pytest.approx(C / (w * (H + C)))
    end = p.now
    assert end == pytest.approx(3e-4 + r * w * H + 1e-4), "attention, the host share, then the device part"
    assert end < 3e-4 + C + 1e-4, "sooner than the whole copy"
    assert p.link_free == pytest.approx(3e-4 + C + 1e-4), "the link carried the whole expert once"
    assert p.t.split_runs == 1 and p.t.demand_copies == 1
    p.end_pass()
    p.prefetch(0)
    assert [op.kind for op in p.serve(0, {1: 1}).ops] == ["run"]
    q = Planner(ExpertCache(4, "lru"), CostModel(cal), 2, scheme="lru", num_experts=4, cpu_experts=False)
    q.prefetch(0)
    assert [op.kind for op in q.serve(0, {1: 1}).ops] == ["copy", "run"], "no host cores: no split"


def test_host_cores_are_on_by_default_only_beside_a_cuda_device():
    from moe_runtime.offload.config import CPU_EXPERTS_CHOICES, OffloadConfig
    auto = OffloadConfig(gpu_expert_slots=2)
    assert auto.cpu_experts == "auto"
    assert auto.host_experts(torch.device("cuda")) and not auto.host_experts(torch.device("cpu"))
    assert OffloadConfig(gpu_expert_slots=2, cpu_experts=True).host_experts(torch.device("cpu"))
    assert not OffloadConfig(gpu_expert_slots=2, cpu_experts=False).host_experts(torch.device("cuda"))
    assert CPU_EXPERTS_CHOICES == {"auto": "auto", "on": True, "off": False}
    with pytest.raises(ValueError, match="cpu_experts='yes' must be True, False or 'auto'"):
        OffloadConfig(gpu_expert_slots=2, cpu_experts="yes")


PEER_POLICIES = ("fiddler", "llama-cpp-n-cpu-moe", "ktransformers", "hybrid", "hybrid-lru")


@pytest.mark.parametrize("policy", PEER_POLICIES)
def test_engine_equals_simulator_for_the_host_using_peers(recorded, policy):
    """The peers run in the engine: hits, misses, host runs, copies and bytes equal the simulator's,
    with the hot set profiled from the first pass (no profile) and from a given profile."""
    from moe_runtime.offload.simulate import profile_of
    model, trace, _, cal, prompt = recorded
    steps = steps_of(trace)
    host = Calibration(device="cpu", expert_bytes=cal.expert_bytes, copy_s=1e-3, tokens=(1, 64),
                       host_s=(1.5e-3, 96e-3), device_s=(1e-4, 1e-3), act_s_per_token=0.0, attn_s=3e-4)
    prof = profile_of(steps[:4], trace.num_layers, trace.num_experts)
    for slots, profile in ((3, None), (6, None), (12, prof), (24, None)):
        engine = ExpertCacheEngine(model, gpu_expert_slots=slots, policy=policy, device="cpu", calibration=host,
                                   keep_banks=True, profile=profile)
        engine.generate(prompt, NEW, temperature=0.8, generator=torch.Generator().manual_seed(0))
        c = engine.runtime.c
        sim = simulate(trace, policy, slots, host, steps=steps, profile=profile)
        got = (c.hits, c.misses, c.cpu_served, engine.copies.bytes_moved, engine.copies.copies)
        want = (sim["hits"], sim["misses"], sim["cpu_served"], sim["bytes_moved"], sim["copies"])
        assert got == want, (policy, slots, got, want)
        if slots < 24 and policy in ("ktransformers", "llama-cpp-n-cpu-moe"):
            assert c.cpu_served > 0 and sim["decode"]["copies"] == 0, "these peers never copy during decode"
        engine.runtime.cache.check_invariants()
        engine.close()


def test_peer_pinned_sets():
    """llama.cpp pins whole layers (the last ones); the hot-set peers the profile's most used keys and
    keep them through any routing; a profile of the wrong shape is refused."""
    cal = _cal(1e-3, 3e-4)
    L, E = 4, 8
    prof = np.zeros((L, E))
    prof[1, 2], prof[3, 5], prof[0, 7] = 0.9, 0.8, 0.1
    p = Planner(ExpertCache(10, "llama-cpp-n-cpu-moe"), CostModel(cal), L, scheme="llama-cpp-n-cpu-moe", num_experts=E)
    p.preload()
    assert set(p.cache.slot_of) == {(3, e) for e in range(E)}
    p = Planner(ExpertCache(4, "ktransformers"), CostModel(cal), L, scheme="ktransformers", num_experts=E, profile=prof)
    p.preload()
    assert set(p.cache.slot_of) == {(1, 2), (3, 5), (0, 7)}, "unused keys are never pinned"
    _warm(p, 40)
    assert {(1, 2), (3, 5), (0, 7)} <= set(p.cache.slot_of) and p.t.demand_copies == 0
    with pytest.raises(ValueError, match="profile has shape"):
        Planner(ExpertCache(4, "hybrid"), CostModel(cal), L, scheme="hybrid", num_experts=E, profile=np.zeros((2, 2)))
