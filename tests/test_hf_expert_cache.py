"""transformers models through the expert cache (offload/transformers_cache.py), one tiny random
model per family: `model.generate()` with a quarter of the experts in device slots must give the
tokens of the same model fully resident (logits within fp32 rounding), greedy, sampled under a
fixed seed, beam search, and a left-padded batch where EOS stops each row where the resident
model stops it. Host as device; the experts leave the model's parameters for the host store."""
from __future__ import annotations

import copy

import pytest
import torch
import transformers

from moe_runtime.offload.config import OffloadConfig
from tests.helpers import assert_close, single_thread  # noqa: F401  (single_thread: autouse, one torch thread)

# offload.transformers_cache imports transformers.integrations.moe, which imports triton; imported at
# collection time that would precede tests/test_kernels_triton.py setting TRITON_INTERPRET=1 and break
# its interpreted kernels, so this module imports it only when a test runs.


def _tc():
    from moe_runtime.offload import transformers_cache
    return transformers_cache


def enable_expert_cache(model, config):
    return _tc().enable_expert_cache(model, config)

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def hf_model(family: str, **kw):
    """A tiny random transformers model: 3 layers, 8 experts, top-2, GQA (Qwen2-MoE: layer 0
    dense, a gated shared expert; OLMoE: q/k norm, no top-k renormalisation)."""
    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.05,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "mixtral":
        cfg, cls = transformers.MixtralConfig(intermediate_size=24, num_local_experts=8, **common), \
            transformers.MixtralForCausalLM
    elif family == "qwen2_moe":
        cfg, cls = transformers.Qwen2MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                                               shared_expert_intermediate_size=48, mlp_only_layers=[0], **common), \
            transformers.Qwen2MoeForCausalLM
    elif family == "olmoe":
        cfg, cls = transformers.OlmoeConfig(intermediate_size=24, num_experts=8, **common), transformers.OlmoeForCausalLM
    else:
        cfg, cls = transformers.Qwen3MoeConfig(intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                                               norm_topk_prob=True, **common), transformers.Qwen3MoeForCausalLM
    for k, v in kw.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return cls(cfg).eval()


def pair(family: str, policy: str = "predictive", cpu_experts: bool = False):
    """(resident model, the same weights through the cache at 25% of the experts)."""
    resident = hf_model(family)
    cached = copy.deepcopy(resident)
    enable_expert_cache(cached, OffloadConfig(expert_fraction=0.25, policy=policy, cpu_experts=cpu_experts,
                                              device="cpu"))
    return resident, cached


def _gen(model, ids, **kw):
    return model.generate(ids, return_dict_in_generate=True, output_logits=True, pad_token_id=0, **kw)


@pytest.fixture(scope="module", params=FAMILIES)
def models(request):
    return (request.param, *pair(request.param))


def test_greedy_equals_resident(models):
    family, resident, cached = models
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    want, got = _gen(resident, ids, max_new_tokens=12, do_sample=False), _gen(cached, ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got.sequences, want.sequences), family
    assert_close(torch.stack(got.logits), torch.stack(want.logits), torch.float32, f"{family} logits")
    rep = cached.expert_cache.report()
    lay = cached.expert_cache.store.layout
    assert rep["slots"] == lay.total_experts // 4 and rep["new_tokens"] == 12 and rep["batch"] == 2
    assert rep["bytes_moved"] > 0 and rep["hit_rate"] is not None and rep["prediction"]["precision"] is not None
    assert not any(n.endswith(("gate_up_proj", "down_proj")) and "experts" in n for n, _ in cached.named_parameters()), \
        "routed expert weights must live in the host store only"


def test_sampling_with_seed_equals_resident(models):
    family, resident, cached = models
    ids = torch.randint(1, 100, (2, 5), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.9, top_k=30)
    torch.manual_seed(5)
    want = _gen(resident, ids, **kw).sequences
    torch.manual_seed(5)
    got = _gen(cached, ids, **kw).sequences
    assert torch.equal(got, want), family


def test_beam_search_runs_and_equals_resident(models):
    family, resident, cached = models
    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    want = resident.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    got = cached.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert got.shape == (1, 12) and torch.equal(got, want), family
    assert cached.expert_cache.report()["batch"] == 3, "the beams run as a batch of 3"


def test_eos_stops_each_row_of_a_padded_batch(models):
    family, resident, cached = models
    ids = torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    for b, pad in enumerate((0, 3, 5)):  # left padding, as generate() expects for decoders
        ids[b, :pad], mask[b, :pad] = 0, 0
    free = resident.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)[:, 8:]
    first = lambda t: [row.tolist().index(t) if t in row.tolist() else 10 for row in free]  # noqa: E731
    eos = next((t for t in free[0].tolist() if len(set(first(t))) > 1), None)
    assert eos is not None, "no token stops the rows at different steps; change the seed"
    want = resident.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)
    got = cached.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)
    assert torch.equal(got, want), family
    stops = [row.tolist().index(eos) if eos in row.tolist() else None for row in got[:, 8:]]
    assert len(set(stops)) > 1 and any(s is not None for s in stops)


def test_lru_with_host_experts_is_exact_too():
    resident, cached = pair("mixtral", policy="lru", cpu_experts=True)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(6))
    assert torch.equal(cached.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0),
                       resident.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0))
    rep = cached.expert_cache.report()
    assert rep["predictor"] == "none" and rep["cpu_experts"] and rep["prefetch"]["issued"] == 0


def test_streamer_and_stopping_criteria_are_transformers_own(models):
    """generate()'s streamer sees every token; a custom StoppingCriteria stops the cached model
    exactly where it stops the resident one."""
    family, resident, cached = models

    class Collect(transformers.generation.BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.chunks.append("end")

    class StopAfterRepeat(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == input_ids[:, -2]  # a token repeated: stop that row

    ids = torch.randint(1, 100, (1, 6), generator=torch.Generator().manual_seed(8))
    streamer = Collect()
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0,
              stopping_criteria=transformers.StoppingCriteriaList([StopAfterRepeat()]))
    got = cached.generate(ids, streamer=streamer, **kw)
    assert torch.equal(got, resident.generate(ids, **kw)), family
    assert streamer.chunks[0] == ids[0].tolist() and streamer.chunks[-1] == "end"
    assert sum(streamer.chunks[1:-1], []) == got[0, 6:].tolist()


def test_from_pretrained_with_the_registered_implementation(tmp_path):
    resident = hf_model("qwen3_moe")
    resident.save_pretrained(tmp_path)
    ids = torch.randint(1, 100, (1, 5), generator=torch.Generator().manual_seed(7))
    name = _tc().EXPERTS_IMPLEMENTATION
    bare = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=name)
    with pytest.raises(RuntimeError, match="enable_expert_cache"):
        bare(ids)
    model = _tc().load_with_expert_cache(str(tmp_path), OffloadConfig(gpu_expert_slots=3, device="cpu"))
    assert model.config._experts_implementation == _tc().EXPERTS_IMPLEMENTATION
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       resident.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_other_models_and_settings_are_refused():
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="model_type='llama' is not supported.*Mixtral"):
        enable_expert_cache(llama, OffloadConfig(gpu_expert_slots=2))
    model = hf_model("olmoe")
    with pytest.raises(ValueError, match="route after attention"):
        enable_expert_cache(model, OffloadConfig(gpu_expert_slots=2, predictor="exact"))
    with pytest.raises(ValueError, match="exactly one of"):
        OffloadConfig(gpu_expert_slots=2, expert_fraction=0.5)
    model.hf_device_map = {"": "cpu"}
    with pytest.raises(ValueError, match="dispatched with a device_map"):
        enable_expert_cache(model, OffloadConfig(gpu_expert_slots=2, device="cpu"))
    del model.hf_device_map
    enable_expert_cache(model, OffloadConfig(gpu_expert_slots=2, device="cpu"))
    with pytest.raises(ValueError, match="already runs through an expert cache"):
        enable_expert_cache(model, OffloadConfig(gpu_expert_slots=2, device="cpu"))


@pytest.mark.parametrize("policy,cpu_experts", [("lru", False), ("predictive", False), ("predictive", True)])
def test_same_weights_same_decisions_as_our_engine(tmp_path, policy, cpu_experts):
    """Our MoETransformer exported as a Mixtral checkpoint: through the transformers integration the
    cache sees the same routing, gets the same lookahead predictions and, with the same
    calibration, makes the same decisions as ExpertCacheEngine: equal tokens and statistics."""
    from moe_runtime.core.config import ModelConfig, MoEConfig
    from moe_runtime.core.hf import export_hf
    from moe_runtime.core.model import MoETransformer
    from moe_runtime.offload.engine import ExpertCacheEngine
    cfg = ModelConfig(d_model=32, n_layers=3, n_heads=4, max_seq_len=64, moe=MoEConfig(num_experts=8, top_k=2,
                                                                                      d_expert=24))
    torch.manual_seed(0)
    ours = MoETransformer(cfg).eval()
    export_hf(ours, cfg, tmp_path / "ck", family="mixtral")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    config = OffloadConfig(expert_fraction=0.25, policy=policy, cpu_experts=cpu_experts, device="cpu")
    engine = ExpertCacheEngine(ours, config)
    _tc().enable_expert_cache(hf, config, calibration=engine.calibration)
    prompt = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(9))
    res = engine.generate(prompt, 10)
    out = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out[:, 8:], res.tokens)
    a, b = res.report, hf.expert_cache.report()
    assert a["decode"]["expert_uses"] == b["decode"]["expert_uses"] > 0
    if cpu_experts:
        return  # host runs vs waits weigh the measured time left on in-flight copies: not deterministic
    for key in ("hit_rate", "hit_rate_all", "bytes_moved", "decisions", "prefetch", "decode"):
        assert a[key] == b[key], key
    timed = ("stall_s",)  # measured, not decided
    assert {k: v for k, v in a["prefill"].items() if k not in timed} == \
        {k: v for k, v in b["prefill"].items() if k not in timed}
    assert a["prediction"]["precision"] == b["prediction"]["precision"]
