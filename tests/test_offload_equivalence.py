"""Offloaded generation equals resident generation: the same tokens, and logits equal up to fp32
summation order.

The engine swaps each ExpertBank for a slot-cache expert source and runs the model's own math, each
expert through the same kernel call over the same rows: every policy, every capacity (including
fewer slots than one layer's experts at batch 2 = 4 experts), with and without host experts, exact /
lookahead / learned prediction, both router positions, a leading dense block, streaming prefill,
sampling, bf16. Tokens must be equal. Logits are bit-equal on some CPUs, but the BLAS behind a GEMM
may sum in another order for weights read from a slot than from the resident bank (oneDNN promises
nothing across buffers; on an AVX-512 AMD EPYC the difference is 1 ulp, 5.96e-08), and a split run
(host cores take the first rows of W13 while the rest is copied) adds two partial sums over the model
dim: so logits are held to the fp32 reordering bound of tests/test_offload_support.py, which is
~1e-4 of what a wrong expert does.
"""
from __future__ import annotations

import pytest
import torch

from moe_runtime.offload.cpu_experts import Calibration
from moe_runtime.offload.engine import ExpertCacheEngine
from moe_runtime.offload.predictor import LearnedPredictor
from moe_runtime.offload.trace import TraceRecorder
from tests.test_offload_support import (assert_logits_match, resident_generate, single_thread,  # noqa: F401
                                        tiny_cfg, twin_models)

NEW = 10


def _prompt(B: int = 2, S: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 256, (B, S), generator=torch.Generator().manual_seed(seed))


def _check(cfg, prompt, **engine_kw):
    resident, offloaded = twin_models(cfg)
    want_tokens, want_logits = resident_generate(resident, prompt, NEW)
    engine = ExpertCacheEngine(offloaded, device="cpu", **engine_kw)
    res = engine.generate(prompt, NEW, return_logits=True)
    assert torch.equal(res.tokens, want_tokens), f"tokens differ for {engine_kw}"
    assert_logits_match(res.logits, want_logits, cfg, str(engine_kw))
    engine.runtime.cache.check_invariants()
    return res.report


@pytest.mark.parametrize("position", ["post_attention", "pre_attention"])
@pytest.mark.parametrize("policy", ["lru", "lfu", "predictive", "default"])
@pytest.mark.parametrize("slots", [1, 3, 8, 24])
@pytest.mark.parametrize("cpu_experts", [False, True])
def test_offloaded_equals_resident(position, policy, slots, cpu_experts):
    r = _check(tiny_cfg(position), _prompt(), gpu_expert_slots=slots, policy=policy, cpu_experts=cpu_experts)
    assert r["decode"]["expert_uses"] > 0 and r["slots"] == slots
    if slots == 24 and not cpu_experts:
        assert r["hit_rate"] > 0.5, "with every expert fitting, decode should mostly hit"


def _forced(copy_s: float, host_s: float, device_s: float, attn_s: float = 0.0) -> Calibration:
    """A cost model that makes one decision win, to drive every path (not a performance claim)."""
    return Calibration(device="cpu", expert_bytes=1, copy_s=copy_s, tokens=(1, 64), host_s=(host_s, 64 * host_s),
                       device_s=(device_s, 64 * device_s), act_s_per_token=0.0, attn_s=attn_s)


@pytest.mark.parametrize("which,cal", [("cpu", _forced(1.0, 1e-6, 1e-3)), ("copy", _forced(1e-6, 1.0, 1e-6)),
                                       ("wait", _forced(1e-4, 1.0, 1e-6, attn_s=2e-5))])
def test_every_miss_decision_path_is_exact(which, cal):
    r = _check(tiny_cfg("pre_attention"), _prompt(), gpu_expert_slots=3, policy="predictive", cpu_experts=True,
               calibration=cal)
    assert r["decisions"][which] > 0, r["decisions"]
    # A prefetch pays only with an attention window to hide in: "wait" (a prefetch still landing)
    # needs one shorter than a copy.
    if which == "cpu":
        assert r["decode"]["cpu_served"] > 0 and r["prefetch"]["issued"] > 0


def test_stream_regime_for_prefill_is_exact():
    r = _check(tiny_cfg(), _prompt(B=2, S=24), gpu_expert_slots=5, policy="lru")
    assert r["prefill"]["stream_steps"] == 3, "a 48-token prefill uses every expert: whole layers stream"
    assert r["prefill"]["stream_copies"] > 0


def test_dense_first_layer_and_lookahead_depth_two():
    cfg = tiny_cfg(n_layers=4, first_dense_layers=1)
    r = _check(cfg, _prompt(), gpu_expert_slots=6, policy="predictive", predictor="lookahead", lookahead_depth=2)
    assert set(r["prediction"]["per_distance"]) == {"0", "1", "2"}
    assert set(r["prediction"]["per_layer"]) == {"0", "1", "2"}


def test_exact_predictor_is_never_wrong():
    r = _check(tiny_cfg("pre_attention"), _prompt(), gpu_expert_slots=8, policy="predictive", predictor="exact",
               lookahead_depth=0)
    d0 = r["prediction"]["per_distance"]["0"]
    assert d0["precision"] == 1.0 and d0["recall"] == 1.0
    # A certain prediction is copied before attention only while the link has room (a copy behind a busy
    # link lands no earlier than the demand miss would): most, not all, decode experts are in flight.
    assert r["prefetch"]["issued"] > 0 and r["hit_rate"] > 0.5


def test_learned_predictor_drives_prefetch_exactly():
    cfg = tiny_cfg()
    model, _ = twin_models(cfg)
    with TraceRecorder(cfg.num_moe_layers, 8, 2).attach(model) as rec:
        model(torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5)))
    learned = LearnedPredictor.fit(rec.to_trace(), depth=1, steps=50)
    r = _check(cfg, _prompt(), gpu_expert_slots=6, policy="predictive", predictor=learned)
    assert r["predictor"] == "learned" and r["prefetch"]["issued"] > 0
    assert r["prediction"]["precision"] is not None


def test_bf16_and_capacity_in_gib():
    cfg = tiny_cfg()
    resident, offloaded = twin_models(cfg, dtype=torch.bfloat16)
    prompt = _prompt()
    want, _ = resident_generate(resident, prompt, NEW)
    expert_gib = 3 * 32 * 24 * 2 / 2**30
    engine = ExpertCacheEngine(offloaded, gpu_expert_gib=4.5 * expert_gib, policy="lfu", device="cpu")
    assert engine.pool.num_slots == 4 and engine.store.layout.dtype == torch.bfloat16
    assert torch.equal(engine.generate(prompt, NEW).tokens, want)


def test_sampled_generation_matches_model_generate():
    resident, offloaded = twin_models(tiny_cfg())
    prompt = _prompt()
    want = resident.generate(prompt, NEW, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(7))
    engine = ExpertCacheEngine(offloaded, gpu_expert_slots=4, policy="predictive", cpu_experts=True, device="cpu")
    got = engine.generate(prompt, NEW, temperature=0.9, top_k=20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got.tokens, want)


def test_close_restores_the_resident_model():
    resident, offloaded = twin_models(tiny_cfg())
    prompt = _prompt()
    engine = ExpertCacheEngine(offloaded, gpu_expert_slots=2, policy="lru", device="cpu", keep_banks=True)
    engine.generate(prompt, 3)
    model = engine.close()
    assert torch.equal(model.generate(prompt, NEW), resident.generate(prompt, NEW))
    engine2 = ExpertCacheEngine(model, gpu_expert_slots=2, policy="lru", device="cpu", store=engine.store)
    assert engine2.store is engine.store
    assert torch.equal(engine2.generate(prompt, NEW).tokens, resident.generate(prompt, NEW))


def test_bad_arguments_are_refused():
    _, m = twin_models(tiny_cfg())
    with pytest.raises(ValueError, match="policy='fifo' is not one of lru, lfu, predictive"):
        ExpertCacheEngine(m, gpu_expert_slots=2, policy="fifo", device="cpu")
    with pytest.raises(ValueError, match="exactly one of gpu_expert_slots"):
        ExpertCacheEngine(m, gpu_expert_slots=2, gpu_expert_gib=1.0, device="cpu")
    with pytest.raises(ValueError, match="gpu_expert_slots=0 must be >= 1"):
        ExpertCacheEngine(m, gpu_expert_slots=0, device="cpu")
    _, m = twin_models(tiny_cfg())
    with pytest.raises(ValueError, match="needs a model trained with router_position='pre_attention'"):
        ExpertCacheEngine(m, gpu_expert_slots=2, policy="predictive", predictor="exact", device="cpu")
    _, m = twin_models(tiny_cfg())
    with pytest.raises(ValueError, match="holds no expert"):
        ExpertCacheEngine(m, gpu_expert_gib=1e-9, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy,cpu_experts", [("lru", False), ("predictive", False), ("predictive", True)])
def test_offloaded_equals_resident_on_gpu(policy, cpu_experts):
    """On CUDA the expert kernels may group differently and host experts run on the CPU: tokens
    must match, logits within fp32 tolerance."""
    from tests.helpers import assert_close
    cfg = tiny_cfg("pre_attention")
    resident, offloaded = twin_models(cfg)
    prompt = _prompt().cuda()
    want_tokens, want_logits = resident_generate(resident.cuda(), prompt, NEW)
    engine = ExpertCacheEngine(offloaded, gpu_expert_slots=3, policy=policy, cpu_experts=cpu_experts, device="cuda")
    assert engine.store.pinned
    res = engine.generate(prompt, NEW, return_logits=True)
    assert torch.equal(res.tokens, want_tokens.cpu())
    assert_close(res.logits, want_logits.cpu(), what=f"{policy} cpu_experts={cpu_experts}")


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_split_runs_match_resident(slots):
    """Copy and host cores at parity: misses run split (host cores on W13's first rows while the
    rest is copied); the same tokens, logits within fp32 rounding, every slot ends whole."""
    cal = _forced(1e-3, 1e-3, 1e-6)
    r = _check(tiny_cfg("post_attention"), _prompt(), gpu_expert_slots=slots, policy="predictive", cpu_experts=True,
               calibration=cal)
    assert r["decode"]["expert_uses"] > 0
    resident, offloaded = twin_models(tiny_cfg("post_attention"))
    engine = ExpertCacheEngine(offloaded, device="cpu", gpu_expert_slots=slots, policy="predictive", cpu_experts=True,
                               calibration=cal)
    engine.generate(_prompt(), NEW)
    assert engine.runtime.c.split_runs > 0
    _assert_slots_whole(engine.runtime)


def _assert_slots_whole(rt) -> None:
    """After the fills land, each slot holds its whole expert."""
    rt.copies.synchronize()
    for slot, key in enumerate(rt.loaded):
        if key is not None:
            assert torch.equal(rt.pool.w13_SDF2[slot].cpu(), rt.store.w13(*key))
            assert torch.equal(rt.pool.w2_SFD[slot].cpu(), rt.store.w2(*key))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_runs_match_resident_on_gpu():
    """Split runs on CUDA: the device part's copy event, the host share's partial sums, the fill
    re-recording the event behind the run: tokens equal, logits close, every slot whole after."""
    from tests.helpers import assert_close
    cfg = tiny_cfg("pre_attention")
    resident, offloaded = twin_models(cfg)
    prompt = _prompt().cuda()
    want_tokens, want_logits = resident_generate(resident.cuda(), prompt, NEW)
    engine = ExpertCacheEngine(offloaded, gpu_expert_slots=3, policy="predictive", cpu_experts=True, device="cuda",
                               calibration=_forced(1e-3, 1e-3, 1e-6))
    res = engine.generate(prompt, NEW, return_logits=True)
    assert torch.equal(res.tokens, want_tokens.cpu())
    assert_close(res.logits, want_logits.cpu(), what="split runs on CUDA")
    assert engine.runtime.c.split_runs > 0
    _assert_slots_whole(engine.runtime)


@pytest.mark.parametrize("host_share", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_split_run_computes_the_expert(host_share, dtype):
    """Host rows [0, d) + device rows [d, D) of W13, then SwiGLU and W2: the expert's output for any
    share, the whole of W13 on either side included (d = 0 and d = D)."""
    from moe_runtime.offload.cpu_experts import expert_forward
    from moe_runtime.offload.plan import Op
    _, model = twin_models(tiny_cfg("post_attention"))
    engine = ExpertCacheEngine(model.to(dtype), device="cpu", gpu_expert_slots=2, policy="lru",
                               calibration=_forced(1e-3, 1e-3, 1e-6))
    rt, key = engine.runtime, (0, 3)
    rt._issue(Op("copy", key, 1, None, host_share))
    x = torch.randn(5, rt.store.layout.d_model, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = torch.empty_like(x)
    rt._run_split(key, 1, host_share, x, y)
    want = expert_forward(x, rt.store.w13(*key), rt.store.w2(*key), torch.tensor([5]))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(y.float(), want.float(), atol=tol, rtol=tol), float((y.float() - want.float()).abs().max())
    d = round(host_share * rt.store.layout.d_model)
    rt.copies.synchronize()
    assert torch.equal(rt.pool.w13_SDF2[1, d:], rt.store.w13(*key)[d:]), "the device part landed"
    assert torch.equal(rt.pool.w2_SFD[1], rt.store.w2(*key))


@pytest.mark.parametrize("policy", ["fiddler", "llama-cpp-n-cpu-moe", "ktransformers", "hybrid", "hybrid-lru"])
@pytest.mark.parametrize("slots", [1, 3, 8, 24])
def test_host_using_peers_equal_resident(policy, slots):
    """The peers' host runs, staged copies and pinned sets compute the resident model's tokens."""
    r = _check(tiny_cfg("post_attention"), _prompt(), gpu_expert_slots=slots, policy=policy,
               calibration=_forced(1e-3, 1.5e-3, 1e-6))
    assert r["decode"]["expert_uses"] > 0
