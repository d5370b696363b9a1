"""gpt-oss MXFP4 checkpoints (what the released gpt-oss ships) against transformers' decode of them.

The tiny random gpt-oss of tests/test_hf_gpt_oss.py has its experts packed here into gpt-oss'
*_blocks / *_scales (e2m1 + E8M0, kernels/quant.py's mxfp4 quantiser), in two shards with every
scale apart from its blocks; the reference is transformers' model on what transformers' own
dequantiser (integrations/mxfp4.py convert_moe_packed_tensors) makes of them. Also: the released
config.json's field set, an expert-parallel shard's rows, and `moe serve --hf`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from moe_runtime.core.hf import load_hf, read_hf  # noqa: E402
from moe_runtime.kernels import quant as kq  # noqa: E402
from moe_runtime.offload.engine import ExpertCacheEngine  # noqa: E402
from moe_runtime.offload.hf import load_hf_for_cache  # noqa: E402
from tests.helpers import single_thread  # noqa: F401,E402  (autouse: one torch thread)
from tests.test_hf_gpt_oss import MAX_LEN, V, WINDOW, _forced, gpt_oss_model, hf_greedy, saved, tokens  # noqa: F401,E402


# ---------------------------------------------------------------- MXFP4 checkpoints
def _pack(w_nKO: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss blocks [n, O, K/32, 16] and scales [n, O, K/32] of [n, K, O] weights (rows as given)."""
    qw = kq.quantize(w_nKO, "mxfp4")
    n, O, half = qw.fields["q"].shape
    return qw.fields["q"].reshape(n, O, half // 16, 16).contiguous(), qw.fields["scale"].contiguous()


@pytest.fixture(scope="module")
def mx_saved(saved, tmp_path_factory):
    """(transformers model on the dequantised experts, MXFP4 checkpoint dir)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    hf, path = saved
    out = tmp_path_factory.mktemp("gpt_oss_mx")
    shutil.copy(path / "config.json", out)  # (no model.safetensors: the index below names the shards)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    ref = gpt_oss_model()
    ref.load_state_dict(hf.state_dict())
    tensors = {}
    with safe_open(str(path / "model.safetensors"), "pt") as h:
        for name in h.keys():
            t = h.get_tensor(name)
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = _pack(t)
                tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
                layer, proj = int(name.split(".")[2]), name.rsplit(".", 1)[1]
                with torch.no_grad():  # the reference runs on transformers' own decode of the blocks
                    getattr(ref.model.layers[layer].mlp.experts, proj).copy_(
                        convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            else:
                tensors[name] = t
    # two shards, every *_scales apart from its *_blocks: nothing assumes they share a file
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if not k.endswith("_scales")},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k.endswith("_scales")}}
    for file, part in shards.items():
        save_file(part, str(out / file))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, part in shards.items() for k in part}}))
    return ref, out


@torch.no_grad()
def test_mxfp4_checkpoint_logits_match_transformers_decode(mx_saved, saved):
    ref, path = mx_saved
    ck = read_hf(path, max_seq_len=MAX_LEN)
    assert ck.layout == "mxfp4"
    model, _, _ = load_hf(path, max_seq_len=MAX_LEN)
    x = tokens()
    want = ref(input_ids=x).logits.float()
    err = (model(x).logits - want).abs().max().item()
    assert err < 2e-5, f"max |ours - transformers on dequantised MXFP4| = {err}"
    assert (saved[0](input_ids=x).logits - want).abs().max() > 1e-3, "MXFP4 rounding should be visible"


def test_mxfp4_checkpoint_serves_its_own_bytes_through_the_cache(mx_saved):
    ref, path = mx_saved
    model, _, _, store = load_hf_for_cache(path, max_seq_len=MAX_LEN, pin=False)  # default: as stored
    assert store.layout.quant == "mxfp4"
    with safe_open(str(path / "model-00001-of-00002.safetensors"), "pt") as h:  # layer 1, expert 3: rows
        blocks = h.get_tensor("model.layers.1.mlp.experts.gate_up_proj_blocks")[3]  # de-interleaved, bytes kept
    with safe_open(str(path / "model-00002-of-00002.safetensors"), "pt") as h:
        down = h.get_tensor("model.layers.1.mlp.experts.down_proj_scales")[3]
    q = store.quant_expert(1, 3)
    assert torch.equal(q.w13.fields["q"][0], torch.cat([blocks[0::2], blocks[1::2]]).flatten(1))
    assert torch.equal(q.w2.fields["scale"][0], down)
    for slots, cpu, cal in ((5, False, None), (6, True, _forced(1.0, 1e-6, 1e-3)), (32, False, None)):
        model, _, _, store = load_hf_for_cache(path, max_seq_len=MAX_LEN, pin=False)
        engine = ExpertCacheEngine(model, gpu_expert_slots=slots, policy="lru", cpu_experts=cpu, device="cpu",
                                   store=store, calibration=cal, expert_dtype="mxfp4")
        prompt = tokens(1, 8, seed=2)
        got, theirs = engine.generate(prompt, 20).tokens, hf_greedy(ref, prompt, 20)
        assert torch.equal(got, theirs), f"slots={slots}: engine {got.tolist()} vs transformers {theirs.tolist()}"


@pytest.mark.parametrize("mx", [False, True])
def test_expert_parallel_rank_loads_its_rows(saved, mx_saved, mx):
    """An expert-parallel rank's shard (init_model(expert_rows=...)) gets exactly its rows of the weights
    AND the expert biases, float or MXFP4, and reads only its rows of the expert stacks."""
    from moe_runtime.core.hf import load_hf_weights
    from moe_runtime.core.model import init_model
    path = mx_saved[1] if mx else saved[1]
    ck = read_hf(path, max_seq_len=MAX_LEN)
    full, run, _ = load_hf(path, max_seq_len=MAX_LEN)
    want = dict(full.named_parameters())
    rows = slice(2, 6)
    shard = init_model(run.model, seed=0, expert_rows=rows)
    read = load_hf_weights(ck, shard, expert_rows=rows)
    for name, p in shard.named_parameters():
        expert = name.endswith(("w13_EDF2", "w2_EFD", "b13_EF2", "b2_ED"))
        assert torch.equal(p.detach(), want[name][rows] if expert else want[name]), name
    assert all(span == (2, 6) for n, span in read if ".experts." in n)


def test_real_gpt_oss_config_fields_load(mx_saved, tmp_path):
    """The field set of the released config.json (openai/gpt-oss-120b: rope_scaling + top-level rope_theta,
    experts_per_token, initial_context_length, swiglu_limit without swiglu_alpha, quantization_config,
    torch_dtype), at this test's sizes, maps to the same model as transformers' own save."""
    ref, path = mx_saved
    want = read_hf(path, max_seq_len=MAX_LEN).run.model
    c = ref.config
    real = {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
            "eos_token_id": 7, "experts_per_token": 2, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
            "initial_context_length": 4096, "initializer_range": 0.1, "intermediate_size": 32,
            "layer_types": ["sliding_attention", "full_attention"] * 2, "max_position_embeddings": 256,
            "model_type": "gpt_oss", "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 4,
            "num_key_value_heads": 2, "num_local_experts": 8, "output_router_logits": False, "pad_token_id": 9,
            "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                               "model.embed_tokens", "lm_head"],
                                    "quant_method": "mxfp4"},
            "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                                    "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                                    "truncate": False},
            "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": WINDOW, "swiglu_limit": c.swiglu_limit,
            "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.55.0.dev0",
            "use_cache": True, "vocab_size": V}
    out = tmp_path / "real"
    shutil.copytree(path, out)
    (out / "config.json").write_text(json.dumps(real))
    got = read_hf(out, max_seq_len=MAX_LEN).run.model
    assert dataclasses.replace(got, init_std=want.init_std) == want


def test_moe_serve_hf_mxfp4_completion_equals_transformers(mx_saved, tmp_path):
    """`moe serve --hf` on the MXFP4 checkpoint (its own bytes: an mxfp4 store) answers a completion of
    prompt ids with transformers' greedy tokens on the dequantised model."""

    import httpx

    from moe_runtime.core.cli import build_parser
    from tests.serve_support import ThreadServer
    tokenizers = pytest.importorskip("tokenizers")
    ref, src = mx_saved
    path = tmp_path / "served"
    shutil.copytree(src, path)  # with a tokenizer.json (moe serve speaks text): one word per id
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    args = build_parser().parse_args(["serve", "--hf", str(path), "--gpu-expert-slots", "5", "--device", "cpu",
                                      "--port", "0", "--model-name", "gpt-oss-tiny", "--max-model-len", str(MAX_LEN)])
    server = ThreadServer(None, args=args)
    try:
        port = server.port
        prompt = tokens(1, 8, seed=2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "gpt-oss-tiny", "prompt": prompt[0].tolist(), "max_tokens": 12, "temperature": 0,
            "return_token_ids": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == hf_greedy(ref, prompt, 12)[0].tolist()
    finally:
        server.stop()
