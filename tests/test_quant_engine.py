"""Quantised experts through the expert cache: the store and slots hold quantised bytes, copies
move them, and generation gives the resident model's tokens when that model holds the same
quantised weights (dequantised), for every policy and capacity.

Legend: L MoE layers, E experts, D model dim, F expert hidden dim.
"""
from __future__ import annotations

import pytest
import torch

from moe_runtime.kernels import quant as Q
from moe_runtime.offload.cache import POLICIES
from moe_runtime.offload.config import OffloadConfig
from moe_runtime.offload.cpu_experts import Calibration
from moe_runtime.offload.engine import ExpertCacheEngine
from moe_runtime.offload.quant_host import quantize_dequantize_banks
from tests.helpers import single_thread  # noqa: F401  (autouse: one torch thread)
from tests.test_offload_support import assert_logits_match, resident_generate, tiny_cfg, twin_models

NEW = 8


def _prompt(B: int = 2, S: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(3))


def _forced(copy_s: float, host_s: float, device_s: float, attn_s: float = 0.0) -> Calibration:
    """A cost model that makes one decision win (not a performance claim); skips the start-up timing."""
    return Calibration(device="cpu", expert_bytes=1, copy_s=copy_s, tokens=(1, 64), host_s=(host_s, 64 * host_s),
                       device_s=(device_s, 64 * device_s), act_s_per_token=0.0, attn_s=attn_s)


COPY_WINS = _forced(1e-5, 1.0, 1e-5, attn_s=2e-5)


def _check(fmt: str, calibration: Calibration | None = COPY_WINS, **kw):
    cfg = tiny_cfg("post_attention")
    resident, offloaded = twin_models(cfg)
    quantize_dequantize_banks(resident, fmt)
    prompt = _prompt()
    want_tokens, want_logits = resident_generate(resident, prompt, NEW)
    engine = ExpertCacheEngine(offloaded, OffloadConfig(device="cpu", expert_dtype=fmt, **kw), calibration=calibration)
    res = engine.generate(prompt, NEW, return_logits=True)
    assert torch.equal(res.tokens, want_tokens), f"tokens differ for {fmt} {kw}"
    assert_logits_match(res.logits, want_logits, cfg, f"{fmt} {kw}")
    engine.runtime.cache.check_invariants()
    return engine, res.report


CASES = ([("int4", p, s) for p in POLICIES for s in (1, 3, 24)]
         + [(f, p, s) for f in ("int8", "mxfp4") for p in ("lru", "predictive") for s in (1, 3, 24)])


@pytest.mark.parametrize("fmt,policy,slots", CASES)
def test_quantised_offload_equals_resident_quantised(fmt, policy, slots):
    engine, r = _check(fmt, gpu_expert_slots=slots, policy=policy, cpu_experts=False)
    lay = engine.store.layout
    # slots and store are sized by quantised bytes; copies move quantised bytes
    assert engine.pool.nbytes == lay.buffer_nbytes(slots) and lay.expert_bytes == Q.expert_bytes(32, 24, fmt)
    assert engine.store.nbytes == lay.buffer_nbytes(lay.total_experts)
    assert engine.copies.bytes_moved == engine.copies.copies * lay.expert_bytes
    assert r["decode"]["expert_uses"] > 0


def test_measured_calibration_on_quantised_store():
    """The start-up calibration measures the quantised paths (offload/quant_host.calibrate_store)."""
    engine, _ = _check("int4", calibration=None, gpu_expert_slots=3, policy="lru")
    cal = engine.calibration
    assert cal.expert_bytes == engine.store.layout.expert_bytes and cal.copy_s > 0 and min(cal.host_s) > 0


@pytest.mark.parametrize("fmt", Q.FORMATS)
@pytest.mark.parametrize("which,cal", [("cpu", _forced(1.0, 1e-6, 1e-3)), ("copy", _forced(1e-6, 1.0, 1e-6))])
def test_quantised_host_experts_and_splits(fmt, which, cal):
    """Host experts on quantised store bytes (offload/quant_host.py) and split runs give the same tokens."""
    cfg = tiny_cfg("post_attention")
    resident, offloaded = twin_models(cfg)
    quantize_dequantize_banks(resident, fmt)
    want, _ = resident_generate(resident, _prompt(), NEW)
    engine = ExpertCacheEngine(offloaded, OffloadConfig(device="cpu", expert_dtype=fmt, gpu_expert_slots=3,
                                                        policy="predictive", cpu_experts=True), calibration=cal)
    res = engine.generate(_prompt(), NEW)
    assert torch.equal(res.tokens, want)
    assert res.report["decisions"][which] > 0, res.report["decisions"]


def test_quantised_differs_from_float():
    """The check above is not vacuous: int4 experts change the logits of the float model."""
    cfg = tiny_cfg("post_attention")
    a, b = twin_models(cfg)
    quantize_dequantize_banks(b, "int4")
    _, la = resident_generate(a, _prompt(), 2)
    _, lb = resident_generate(b, _prompt(), 2)
    assert (la - lb).abs().max() > 1e-4


def test_config_errors():
    with pytest.raises(ValueError, match="expert_dtype='int3' is not one of bf16, int8, int4, mxfp4"):
        OffloadConfig(gpu_expert_slots=1, expert_dtype="int3")
    with pytest.raises(ValueError, match="applies to expert_dtype='int4' only"):
        OffloadConfig(gpu_expert_slots=1, expert_dtype="int8", expert_group=32)
    with pytest.raises(ValueError, match="even number in 32..128"):
        OffloadConfig(gpu_expert_slots=1, expert_dtype="int4", expert_group=256)


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_engine_equals_simulator_with_quantised_bytes(policy):
    """Hits, misses, prefetches and bytes of an int4 engine equal the simulator's on the trace it
    recorded, with the calibration's expert_bytes = the quantised expert's bytes."""
    from moe_runtime.offload.simulate import simulate, steps_of
    fmt = "int4"
    nbytes = Q.expert_bytes(32, 24, fmt)
    cal = Calibration(device="cpu", expert_bytes=nbytes, copy_s=1e-3, tokens=(1, 64), host_s=(1.0, 64.0),
                      device_s=(1e-4, 1e-3), act_s_per_token=0.0, attn_s=3e-4)
    _, model = twin_models(tiny_cfg())
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    run = dict(temperature=0.8)
    rec = ExpertCacheEngine(model, OffloadConfig(gpu_expert_slots=24, policy="lru", device="cpu", record_trace=True,
                                                 expert_dtype=fmt), calibration=cal, keep_banks=True)
    rec.generate(prompt, 16, generator=torch.Generator().manual_seed(0), **run)
    trace = rec.trace()
    assert trace.meta["expert_bytes"] == nbytes
    model = rec.close()
    steps = steps_of(trace)
    from moe_runtime.offload.predictor import LearnedPredictor
    learned = LearnedPredictor.fit(trace, 1, steps=50) if policy == "predictive" else None
    for slots in (1, 3, 12):
        engine = ExpertCacheEngine(model, OffloadConfig(gpu_expert_slots=slots, policy=policy, device="cpu",
                                                        expert_dtype=fmt, predictor=learned or "auto"),
                                   calibration=cal, keep_banks=True)
        engine.generate(prompt, 16, generator=torch.Generator().manual_seed(0), **run)
        c = engine.runtime.c
        sim = simulate(trace, policy, slots, cal, learned=learned, steps=steps)
        got = {"hits": c.hits, "misses": c.misses, "bytes_moved": engine.copies.bytes_moved,
               "prefetch_issued": c.prefetch_issued}
        assert got == {k: sim[k] for k in got}, f"{policy} at {slots} slots"
        assert sim["bytes_moved"] == sim["copies"] * nbytes > 0
        engine.close()


@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_transformers_integration_with_quantised_experts(fmt):
    """enable_expert_cache(model, OffloadConfig(expert_dtype=...)): greedy tokens equal the transformers
    model whose experts hold the same quantised weights (dequantised), a quarter of the experts in slots."""
    import copy
    pytest.importorskip("transformers")
    from moe_runtime.offload import transformers_cache as tc
    from tests.test_hf_expert_cache import _gen, hf_model
    resident = hf_model("mixtral")
    cached = copy.deepcopy(resident)
    with torch.no_grad():
        for layer in resident.model.layers:
            ex = layer.mlp.experts  # transformers keeps [E, 2F, D] / [E, D, F] (out, in)
            qe = Q.quantize_experts(ex.gate_up_proj.transpose(1, 2), ex.down_proj.transpose(1, 2), fmt)
            w13, w2 = qe.dequantize(torch.float32)
            ex.gate_up_proj.copy_(w13.transpose(1, 2))
            ex.down_proj.copy_(w2.transpose(1, 2))
    tc.enable_expert_cache(cached, OffloadConfig(expert_fraction=0.25, policy="predictive", device="cpu",
                                                 expert_dtype=fmt))
    assert cached.expert_cache.store.layout.expert_dtype == fmt
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    want = _gen(resident, ids, max_new_tokens=10, do_sample=False).sequences
    got = _gen(cached, ids, max_new_tokens=10, do_sample=False).sequences
    assert torch.equal(got, want)
    assert cached.expert_cache.report()["bytes_moved"] > 0
