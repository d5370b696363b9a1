"""Routing traces: round trip, refusal of corrupted / oversized / wrong-version files, the recorder,
and the trace-driven cache simulator."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe_runtime.core.cli import main
from moe_runtime.offload.engine import ExpertCacheEngine
from moe_runtime.core.serial import seal
from moe_runtime.offload.cpu_experts import Calibration
from moe_runtime.offload.simulate import parse_capacities, simulate, simulate_grid, trace_timing
from moe_runtime.offload.trace import TRACE_FORMAT, TRACE_VERSION, RoutingTrace, TraceError, TraceRecorder
from tests.test_offload_support import single_thread, tiny_cfg, twin_models  # noqa: F401


@pytest.fixture(scope="module")
def trace() -> RoutingTrace:
    _, model = twin_models(tiny_cfg())
    engine = ExpertCacheEngine(model, gpu_expert_slots=6, policy="predictive", device="cpu", record_trace=True)
    engine.generate(torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2)), 8)
    return engine.trace()


def test_round_trip(trace, tmp_path):
    assert len(trace) == (2 * 5 + 2 * 7) * 3, "prefill + decode tokens, times 3 MoE layers"
    back = RoutingTrace.load(trace.save(tmp_path / "t.msgpack"))
    for name in ("step", "seq", "pos", "layer", "experts", "scores"):
        assert np.array_equal(getattr(back, name), getattr(trace, name)), name
    assert back.meta == trace.meta and back.meta["calibration"]["copy_s"] > 0
    assert (back.num_layers, back.num_experts, back.top_k) == (3, 8, 2)
    choices, prev, step = back.token_table()
    assert choices.shape == (24, 3, 2) and int((prev >= 0).sum()) == 24 - 2 and step.max() == 7


def _write(tmp_path, obj_or_bytes) -> str:
    p = tmp_path / "bad.msgpack"
    # dicts are sealed like RoutingTrace.save does, so the body's own checks are what is tested
    p.write_bytes(obj_or_bytes if isinstance(obj_or_bytes, bytes) else seal(obj_or_bytes, TRACE_FORMAT, TRACE_VERSION))
    return str(p)


def test_corrupted_oversized_and_wrong_version_traces_are_refused(trace, tmp_path):
    raw = seal(trace.to_dict(), TRACE_FORMAT, TRACE_VERSION)
    with pytest.raises(TraceError, match="corrupted: .* is truncated"):
        RoutingTrace.load(_write(tmp_path, raw[: len(raw) // 2]))
    with pytest.raises(TraceError, match="corrupted: .* not valid msgpack"):
        RoutingTrace.load(_write(tmp_path, b"\xc1" * 64))
    with pytest.raises(TraceError, match="trailing bytes"):
        RoutingTrace.load(_write(tmp_path, raw + b"\x00"))
    with pytest.raises(TraceError, match="over the limit of 100 bytes"):
        RoutingTrace.load(_write(tmp_path, raw), max_bytes=100)
    with pytest.raises(TraceError, match="corrupted: .* not valid msgpack"):
        RoutingTrace.load(_write(tmp_path, {1: 2}))  # strict_map_key: integer keys are refused
    d = trace.to_dict()
    with pytest.raises(TraceError, match="trace version 99; this build reads version 2"):
        RoutingTrace.load(_write(tmp_path, {**d, "version": 99}))
    with pytest.raises(TraceError, match="is not a routing trace"):
        RoutingTrace.load(_write(tmp_path, {**d, "format": "moe-runtime-checkpoint"}))
    with pytest.raises(TraceError, match="column 'experts' holds 142 values, expected 144"):
        RoutingTrace.load(_write(tmp_path, {**d, "experts": d["experts"][:-4]}))
    with pytest.raises(TraceError, match="not a multiple of 4"):
        RoutingTrace.load(_write(tmp_path, {**d, "scores": d["scores"][:-1]}))
    with pytest.raises(TraceError, match="out of range"):
        RoutingTrace.load(_write(tmp_path, {**d, "experts": b"\xff" * len(d["experts"])}))
    with pytest.raises(TraceError, match="missing or mistypes field 'top_k'"):
        RoutingTrace.load(_write(tmp_path, {k: v for k, v in d.items() if k != "top_k"}))
    with pytest.raises(TraceError, match="does not exist"):
        RoutingTrace.load(tmp_path / "nope.msgpack")


def test_recorder_on_a_plain_forward_numbers_sequences():
    model, _ = twin_models(tiny_cfg())
    with TraceRecorder(3, 8, 2, max_records=2 * 4 * 3 * 2).attach(model) as rec:
        model(torch.zeros(2, 4, dtype=torch.long))
        model(torch.ones(2, 4, dtype=torch.long))
        model(torch.ones(2, 4, dtype=torch.long))  # past max_records: not recorded
    t = rec.to_trace()
    assert len(t) == 2 * 4 * 3 * 2
    assert sorted(set(t.seq.tolist())) == [0, 1, 2, 3] and sorted(set(t.pos.tolist())) == [0, 1, 2, 3]
    assert not model._forward_pre_hooks, "the recorder removed its hooks"


def test_simulator_counts_and_timeline(trace):
    timing = Calibration(device="cpu", expert_bytes=trace.meta["expert_bytes"], copy_s=1e-3, tokens=(1,),
                         host_s=(1.0,), device_s=(1e-4,), act_s_per_token=0.0, attn_s=0.1)
    rows = {(r["policy"], r["capacity"]): r for r in
            simulate_grid(trace, ["lru", "lfu", "predictive", "oracle", "belady"], [1, 6, 24], timing)}
    uses = 0
    for s in sorted(set(trace.step.tolist())):
        for m in range(3):
            sel = (trace.step == s) & (trace.layer == m)
            uses += len(set(trace.experts[sel].flatten().tolist()))
    full = rows[("lru", 24)]
    assert full["hits"] == uses and full["misses"] == full["copies"] == 0, "all fit: loaded once, before any step"
    # exact predictions with a long attention window: prefetches (up to 2 x top_k a layer) hide copies
    assert rows[("oracle", 6)]["misses"] < rows[("lru", 6)]["misses"]
    assert rows[("oracle", 6)]["stall_s"] < rows[("lru", 6)]["stall_s"]
    assert rows[("lru", 1)]["hit_rate"] < rows[("lru", 24)]["hit_rate"]
    for cap in (1, 6):  # the offline optimum of demand paging misses least
        assert rows[("belady", cap)]["misses"] <= min(rows[(p, cap)]["misses"] for p in ("lru", "lfu"))
    for r in rows.values():
        assert r["bytes_moved"] == r["copies"] * trace.meta["expert_bytes"]
        assert r["time_s"] >= r["stall_s"] >= 0
    assert rows[("lru", 1)]["stall_s"] == pytest.approx(rows[("lru", 1)]["misses"] * 1e-3)
    with pytest.raises(ValueError, match="policy='mru' is not one of"):
        simulate(trace, "mru", 2, timing)


def test_trace_timing_and_capacity_parsing(trace):
    t = trace_timing(trace)
    assert t.copy_s == trace.meta["calibration"]["copy_s"] and t.attn_s > 0 and t.expert_bytes > 0
    assert trace_timing(trace, copy_ms=2.0).copy_s == 0.002
    bare = RoutingTrace(3, 8, 2, trace.step, trace.seq, trace.pos, trace.layer, trace.experts, trace.scores)
    with pytest.raises(ValueError, match="carries no calibration"):
        trace_timing(bare)
    assert parse_capacities("25%,50%,7", 24) == [6, 12, 7]
    with pytest.raises(ValueError, match="neither a slot count nor a percentage"):
        parse_capacities("half", 24)


def test_trace_simulate_command(trace, tmp_path, capsys):
    path = trace.save(tmp_path / "t.msgpack")
    out = tmp_path / "sim.json"
    assert main(["trace", "simulate", str(path), "--capacities", "25%,100%", "--policies", "lru,oracle",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hit rate" in text and "oracle" in text
    rows = json.loads(out.read_text())["rows"]
    assert [(r["policy"], r["capacity"]) for r in rows] == [("lru", 6), ("oracle", 6), ("lru", 24), ("oracle", 24)]
    assert main(["trace", "simulate", str(path), "--policies", "mru"]) == 2
    assert "not in lru, lfu, predictive, oracle, belady" in capsys.readouterr().err
    assert main(["trace", "simulate", str(path), "--model-shape", "mixtral-8x7b"]) == 2
    assert "give --model-shape and --link together" in capsys.readouterr().err


def test_trace_simulate_projects_onto_a_model_shape(trace, tmp_path, capsys):
    path = trace.save(tmp_path / "t.msgpack")
    out = tmp_path / "proj.json"
    assert main(["trace", "simulate", str(path), "--model-shape", "mixtral-8x7b", "--link", "h100-pcie5",
                 "--capacities", "25%", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tok/s" in text and "MiB/token" in text and "link_source" in text and "54.8" in text
    data = json.loads(out.read_text())
    assert data["constants"]["copy_ms"] == pytest.approx(6.43, abs=0.01)
    for r in data["rows"]:
        p = r["projection"]
        assert p["tokens_per_s"] > 0 and p["bytes_per_token"] == pytest.approx(p["copies_per_token"] * 352321536)
