"""gpt-oss (GptOssForCausalLM) against transformers' own model, dense and through the expert cache.

A tiny random gpt-oss made by transformers (its defaults: YaRN RoPE factor 32, alternating sliding /
full attention starting with sliding, attention and router biases, sinks, clamped SwiGLU with
interleaved gate/up) with its zero-initialised biases, sinks and norms randomised so each of them
moves the logits, and swiglu_limit=1.5 (default 7.0) so the clamp bites at these small weights.
The prompt (20 tokens) is 4x the sliding window (5). Nothing downloads.
MXFP4 checkpoints, the released config.json's fields, expert-parallel shards and `moe serve`:
tests/test_hf_gpt_oss_mxfp4.py.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_runtime.core.hf import HFCheckpointError, load_hf, read_hf  # noqa: E402
from moe_runtime.core.model import MoETransformer  # noqa: E402
from moe_runtime.offload.cpu_experts import Calibration  # noqa: E402
from moe_runtime.offload.engine import ExpertCacheEngine  # noqa: E402
from moe_runtime.offload.hf import load_hf_for_cache  # noqa: E402
from tests.helpers import single_thread  # noqa: F401,E402  (autouse: one torch thread)

V, WINDOW, MAX_LEN = 100, 5, 64


def gpt_oss_model(**kw):
    args = dict(num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2, hidden_size=64, intermediate_size=32,
                head_dim=16, num_attention_heads=4, num_key_value_heads=2, vocab_size=V, sliding_window=WINDOW,
                max_position_embeddings=256, initializer_range=0.1, bos_token_id=None, eos_token_id=None,
                pad_token_id=None, swiglu_limit=1.5)
    cfg = transformers.GptOssConfig(**{**args, **kw})
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises these to zeros / ones: make every one of them count
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")) or "norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = gpt_oss_model()
    path = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(path)
    return model, path


def tokens(B: int = 2, S: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


def hf_greedy(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, prompt.shape[1]:]


@torch.no_grad()
def test_config_maps_every_gpt_oss_difference(saved):
    _, path = saved
    m = read_hf(path, max_seq_len=MAX_LEN).run.model
    assert (m.qkv_bias, m.o_bias, m.attn_sinks, m.sliding_window, m.window_layers) == (True, True, True, WINDOW, "even")
    assert (m.rope_yarn_factor, m.rope_yarn_original_max, m.rope_yarn_truncate, m.rope_theta) == (32.0, 4096, False,
                                                                                                150000.0)
    assert (m.moe.router_bias, m.moe.expert_bias, m.moe.expert_act, m.moe.norm_topk_prob) == (True, True,
                                                                                              "clamped_swiglu", True)
    assert [m.window_of(i) for i in range(4)] == [WINDOW, None, WINDOW, None]


@torch.no_grad()
def test_yarn_tables_equal_transformers(saved):
    hf, path = saved
    model, _, _ = load_hf(path, max_seq_len=MAX_LEN)
    pos = torch.arange(MAX_LEN)[None]
    cos, sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    assert torch.allclose(model.rope_cos, cos[0], atol=1e-6) and torch.allclose(model.rope_sin, sin[0], atol=1e-6)


@torch.no_grad()
def test_logits_match_transformers_fp32_past_the_window(saved):
    hf, path = saved
    model, _, _ = load_hf(path, max_seq_len=MAX_LEN)
    x = tokens()
    want = hf(input_ids=x).logits.float()
    got = model(x).logits
    err = (got - want).abs().max().item()
    assert err < 2e-5, f"max |ours - transformers| = {err}"
    # each gpt-oss feature moves the logits far more than that: the comparison can fail
    moe = model.cfg.moe
    for change in (dict(sliding_window=None), dict(attn_sinks=False), dict(rope_yarn_factor=None),
                   dict(moe=dataclasses.replace(moe, swiglu_limit=100.0)),
                   dict(moe=dataclasses.replace(moe, swiglu_alpha=1.0))):
        other = MoETransformer(dataclasses.replace(model.cfg, **change))
        other.load_state_dict(model.state_dict(), strict=False)
        assert (other.eval()(x).logits - want).abs().max() > 1e-2, change


@torch.no_grad()
def test_bf16_logits_within_bf16_noise(saved, tmp_path):
    """A bf16 checkpoint loads in bf16; our bf16 logits are as close to transformers' bf16 logits as
    transformers' own bf16 logits are to its fp32 ones, at every position whose routing is fp32's.
    A position whose top-k differs from fp32's may exist (bf16 noise on the router input flips a
    near-tie, in transformers' bf16 as in ours: here layer 0 ranks two experts 0.014 apart in fp32, under
    the 0.02 bf16 noise of the router logits); it must be a near-tie, and rare."""
    hf32, _ = saved
    hf16 = gpt_oss_model()
    hf16.load_state_dict(hf32.state_dict())
    hf16 = hf16.to(torch.bfloat16)
    hf16.save_pretrained(tmp_path)
    model, _, _ = load_hf(tmp_path, max_seq_len=MAX_LEN)
    assert model.embed.weight.dtype == torch.bfloat16
    x = tokens()
    out32 = hf32(input_ids=x, output_router_logits=True)
    ref16, ref32, out = hf16(input_ids=x).logits.float(), out32.logits.float(), model(x)
    K = model.cfg.moe.top_k
    same = torch.ones(x.numel(), dtype=torch.bool)
    for l, r in enumerate(out.routing):
        logits32 = out32.router_logits[l].float()
        flip = (r.topk_idx_TK.sort(-1).values != logits32.topk(K).indices.sort(-1).values).any(-1)
        top = logits32.sort(-1, descending=True).values
        assert (top[flip & same, K - 1] - top[flip & same, K] < 0.05).all(), f"layer {l}: a flip that is no near-tie"
        same &= ~flip
    assert int((~same).sum()) <= 3, f"{int((~same).sum())} of {x.numel()} positions route differently"
    keep = same.view(x.shape)
    noise, err = (ref16 - ref32).abs()[keep], (out.logits - ref16).abs()[keep]
    assert float(err.max()) <= 3 * float(noise.max()) and float(err.mean()) <= 3 * float(noise.mean()), (
        f"bf16 max err {float(err.max()):.3e} mean {float(err.mean()):.3e}; transformers' own bf16 noise max "
        f"{float(noise.max()):.3e} mean {float(noise.mean()):.3e}")


def test_clamped_swiglu_equals_transformers_gate():
    """Our [gate | up] activation on de-interleaved h equals GptOssExperts._apply_gate on interleaved h,
    at the default limit 7 with values on both sides of it."""
    from moe_runtime.core.experts import ExpertActivation
    from moe_runtime.core.hf.gpt_oss import deinterleave
    experts = gpt_oss_model(swiglu_limit=7.0).model.layers[0].mlp.experts
    h = torch.randn(50, 64, generator=torch.Generator().manual_seed(0)) * 6
    want = experts._apply_gate(h)
    got = ExpertActivation("clamped_swiglu", 1.702, 7.0)(deinterleave(h, 1))
    assert (h.abs() > 7).any() and torch.allclose(got, want, atol=1e-6)


def test_greedy_generation_identical(saved):
    hf, path = saved
    model, _, _ = load_hf(path, max_seq_len=MAX_LEN)
    prompt = tokens(1, 8, seed=2)
    ours, theirs = model.generate(prompt, 24), hf_greedy(hf, prompt, 24)
    assert torch.equal(ours, theirs), f"ours {ours.tolist()} vs transformers {theirs.tolist()}"


def _forced(copy_s: float, host_s: float, device_s: float) -> Calibration:
    """A cost model that makes one decision win, to drive every path (not a performance claim)."""
    return Calibration(device="cpu", expert_bytes=1, copy_s=copy_s, tokens=(1, 64), host_s=(host_s, 64 * host_s),
                       device_s=(device_s, 64 * device_s), act_s_per_token=0.0, attn_s=0.0)


@pytest.mark.parametrize("policy,slots,cpu,cal", [("lru", 4, False, None), ("predictive", 8, True, None),
                                                  ("predictive", 6, True, _forced(1.0, 1e-6, 1e-3)),
                                                  ("predictive", 6, True, _forced(1e-3, 1e-3, 1e-6)),
                                                  ("lfu", 32, False, None)])
def test_expert_cache_generates_transformers_tokens(saved, policy, slots, cpu, cal):
    """Experts streamed from the shards into the host store; a few slots so experts move (32 = every
    expert resident: the resident path); forced costs drive host runs and split runs (host cores take
    the first rows of W13 while the link copies the rest)."""
    hf, path = saved
    model, _, _, store = load_hf_for_cache(path, max_seq_len=MAX_LEN, pin=False)
    engine = ExpertCacheEngine(model, gpu_expert_slots=slots, policy=policy, cpu_experts=cpu, device="cpu",
                               store=store, calibration=cal)
    prompt = tokens(1, 8, seed=2)
    res = engine.generate(prompt, 24)
    theirs = hf_greedy(hf, prompt, 24)
    assert torch.equal(res.tokens, theirs), f"engine {res.tokens.tolist()} vs transformers {theirs.tolist()}"
    if cal is not None and cal.host_s[0] < 1e-4:
        assert res.report["decisions"]["cpu"] > 0, res.report["decisions"]
    elif cal is not None:
        assert res.report["decode"]["split_runs"] > 0, res.report["decode"]


def test_batch_of_prompts_of_different_lengths(saved):
    """Rows at different positions in one KV cache (the masked attention path, windows per row)
    give each prompt's own transformers tokens."""
    hf, path = saved
    model, _, _, store = load_hf_for_cache(path, max_seq_len=MAX_LEN, pin=False)
    engine = ExpertCacheEngine(model, gpu_expert_slots=6, policy="lru", device="cpu", store=store)
    prompts = [tokens(1, 9, seed=4)[0].tolist(), tokens(1, 3, seed=5)[0].tolist()]
    res = engine.generate(prompts, 14)
    for b, p in enumerate(prompts):
        theirs = hf_greedy(hf, torch.tensor([p]), 14)[0]
        assert res.tokens[b].tolist() == theirs.tolist(), f"row {b}"


def test_moe_generate_hf_cli_matches_transformers(saved, tmp_path):
    from moe_runtime.core.cli import main
    hf, path = saved
    out = tmp_path / "report.json"
    assert main(["generate", "--hf", str(path), "--gpu-expert-slots", "5", "--prompt-ids", "5,17,42,8,9,3",
                 "--max-new-tokens", "16", "--max-seq-len", str(MAX_LEN), "--device", "cpu", "--json", str(out)]) == 0
    theirs = hf_greedy(hf, torch.tensor([[5, 17, 42, 8, 9, 3]]), 16)[0]
    assert json.loads(out.read_text())["tokens"][0] == theirs.tolist()


# ---------------------------------------------------------------- refusals
def _edit(saved_path: Path, tmp: Path, **changes) -> Path:
    out = tmp / "ck"
    shutil.copytree(saved_path, out)
    cfg = json.loads((out / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("changes,pattern", [
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "plain or YaRN RoPE"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                           "mscale": 0.7}), r"mscale=0.7 is not supported"),
    (dict(layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
     r"slides on layers \[0, 1, 3\]"),
    (dict(quantization_config={"quant_method": "bitsandbytes"}), "float or MXFP4"),
    (dict(experts_per_token=3), "experts_per_token=3 and num_experts_per_tok=2 disagree"),
    (dict(sliding_window=None), "sliding_window=None must be a positive int"),
])
def test_unsupported_gpt_oss_fields_are_refused(saved, tmp_path, changes, pattern):
    path = _edit(saved[1], tmp_path, **changes)
    with pytest.raises(HFCheckpointError, match=pattern):
        read_hf(path, max_seq_len=MAX_LEN)


def test_export_refuses_gpt_oss(saved, tmp_path):
    from moe_runtime.core.hf import export_hf
    model, run, _ = load_hf(saved[1], max_seq_len=MAX_LEN)
    with pytest.raises(ValueError, match="gpt-oss only"):
        export_hf(model, run, tmp_path / "out")
    with pytest.raises(ValueError, match="export as gpt_oss is not implemented"):
        export_hf(model, run, tmp_path / "out", "gpt_oss")


def test_training_expert_offload_refuses_gpt_oss_experts(saved):
    from moe_runtime.cluster.offload import enable_expert_offload
    model, _, _ = load_hf(saved[1], max_seq_len=MAX_LEN)
    with pytest.raises(ValueError, match="biases or a clamped SwiGLU"):
        enable_expert_offload(model, torch.device("cpu"))


def test_training_loss_and_gradients_match_transformers(saved):
    """Fine-tuning math: the next-token loss and the gradients of the gpt-oss-only parameters (sinks,
    router bias, expert biases, interleaved gate_up) equal transformers' own backward."""
    from moe_runtime.core.train import build_optimizer
    from moe_runtime.core.config import TrainConfig
    from moe_runtime.core.hf.gpt_oss import deinterleave
    path = saved[1]
    hf = gpt_oss_model()  # a fresh copy: backward fills .grad
    hf.load_state_dict(saved[0].state_dict())
    hf.config._experts_implementation = "eager"  # a differentiable loop over experts on CPU
    model, _, _ = load_hf(path, max_seq_len=MAX_LEN)
    x = tokens()
    want = hf(input_ids=x, labels=x).loss
    want.backward()
    logits = model(x).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))
    loss.backward()
    assert abs(loss.item() - want.item()) < 1e-5
    theirs, ours = hf.model.layers[2], model.blocks[2]
    pairs = [(theirs.self_attn.sinks.grad, ours.attn.sinks.grad),
             (theirs.mlp.router.bias.grad, ours.ffn.router.logit_bias_E.grad),
             (deinterleave(theirs.mlp.experts.gate_up_proj_bias.grad, 1), ours.ffn.experts.b13_EF2.grad),
             (deinterleave(theirs.mlp.experts.gate_up_proj.grad, 2), ours.ffn.experts.w13_EDF2.grad),
             (theirs.mlp.experts.down_proj_bias.grad, ours.ffn.experts.b2_ED.grad)]
    for i, (a, b) in enumerate(pairs):
        assert a.abs().max() > 0 and torch.allclose(a, b, atol=1e-5, rtol=1e-4), i
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(ours.ffn.experts.b13_EF2) in no_decay and id(ours.ffn.experts.w13_EDF2) not in no_decay
