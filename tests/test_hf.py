"""Hugging Face checkpoints (core/hf.py) against transformers' own model classes. No download.

Legend: B batch, S sequence, V vocab, E experts.

Tiny random models of each family are built with transformers, saved with save_pretrained, loaded
here and compared: logits (fp32 tight, bf16 within bf16's own noise), 32 greedy tokens, export
round trips, fine-tuning losses, the expert stream, and malformed directories' error messages.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from moe_runtime.core.config import MoEConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from moe_runtime.core.data import Corpus  # noqa: E402
from moe_runtime.core.hf import HFCheckpointError, export_hf, iter_hf_expert_tensors, load_hf, read_hf  # noqa: E402
from moe_runtime.core.model import MoETransformer  # noqa: E402
from moe_runtime.core.train import Trainer  # noqa: E402
from tests.helpers import assert_close  # noqa: E402
from tests.helpers import single_thread  # noqa: F401,E402  (autouse: one torch thread)

V = 100
FAMILIES = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe")


def hf_model(family: str, **kw):
    """A tiny random transformers model of `family` (2-3 layers, 4 experts, GQA)."""
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.05,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=24, num_local_experts=4, **{**common, **kw})
        cls = transformers.MixtralForCausalLM
    elif family == "qwen2_moe":  # layer 0 dense (first_dense_layers=1), shared expert, qkv bias
        base = dict(common, num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24,
                    shared_expert_intermediate_size=48, num_experts=4, mlp_only_layers=[0])
        cfg, cls = transformers.Qwen2MoeConfig(**{**base, **kw}), transformers.Qwen2MoeForCausalLM
    elif family == "olmoe":  # full q/k norm, norm_topk_prob False
        cfg = transformers.OlmoeConfig(intermediate_size=24, num_experts=4, **{**common, **kw})
        cls = transformers.OlmoeForCausalLM
    else:  # per-head q/k norm, renormalised top-k
        base = dict(common, intermediate_size=40, moe_intermediate_size=24, num_experts=4, norm_topk_prob=True)
        cfg, cls = transformers.Qwen3MoeConfig(**{**base, **kw}), transformers.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (transformers model, directory it was saved to with save_pretrained's defaults)."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            model = hf_model(family)
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            cache[family] = (model, path)
        return cache[family]
    return get


def tokens(B: int = 2, S: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits.float()


@torch.no_grad()
def our_logits(model: MoETransformer, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits


def st_keys(path: Path) -> set[str]:
    keys = set()
    for f in path.glob("*.safetensors"):
        with safetensors_torch.safe_open(str(f), "pt") as h:
            keys.update(h.keys())
    return keys


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("family,kw", [("qwen3_moe", dict(head_dim=16)),  # head_dim != hidden / heads (real Qwen3)
                                       ("mixtral", dict(num_experts_per_tok=1))])  # top-1, weight renormalised to 1
def test_head_dim_and_top1_variants_match(tmp_path, family, kw):
    hf = hf_model(family, **kw)
    hf.save_pretrained(tmp_path)
    model, run, _ = load_hf(tmp_path)
    assert run.model.head_dim == kw.get("head_dim", 8) and run.model.moe.top_k == kw.get("num_experts_per_tok", 2)
    x = tokens()
    assert_close(our_logits(model, x), hf_logits(hf, x), torch.float32, what=f"{family} {kw} logits")
    out = tmp_path / "export"
    export_hf(model, run, out)
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert_close(hf_logits(again, x), hf_logits(hf, x), torch.float32, what="export round trip")


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_fp32(saved, family):
    hf, path = saved(family)
    model, run, tok = load_hf(path)
    assert tok is None and model.embed.weight.dtype == torch.float32
    m = run.model
    expect = {"mixtral": (None, False, 0, 0, True), "qwen2_moe": (None, True, 1, 1, False),
              "olmoe": ("full", False, 0, 0, False), "qwen3_moe": ("head", False, 0, 0, True)}[family]
    assert (m.qk_norm, m.qkv_bias, m.first_dense_layers, m.moe.num_shared_experts, m.moe.norm_topk_prob) == expect
    x = tokens()
    assert_close(our_logits(model, x), hf_logits(hf, x), torch.float32, what=f"{family} logits")


@pytest.mark.parametrize("family,fused,shard", [("mixtral", True, True), ("mixtral", False, True),
                                                ("qwen2_moe", True, False), ("olmoe", True, True)])
def test_fused_and_sharded_layouts_load(saved, tmp_path, family, fused, shard):
    """transformers 5's fused expert tensors (save_original_format=False) and sharded directories."""
    hf, _ = saved(family)
    hf.save_pretrained(tmp_path, save_original_format=not fused, max_shard_size="40KB" if shard else "50GB")
    assert ((tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 1
            ) == shard
    ck = read_hf(tmp_path)
    assert ck.layout == ("fused" if fused else "per_expert")
    model, _, _ = load_hf(tmp_path)
    x = tokens()
    assert_close(our_logits(model, x), hf_logits(hf, x), torch.float32, what=f"{family} fused={fused}")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_within_bf16_noise(saved, tmp_path, family):
    """A bf16 checkpoint loads in bf16; our bf16 logits are as close to transformers' bf16 logits as
    transformers' own bf16 logits are to its fp32 ones (bf16 rounding is the only difference)."""
    hf32, _ = saved(family)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    hf16.save_pretrained(tmp_path)
    model, _, _ = load_hf(tmp_path)
    assert model.embed.weight.dtype == torch.bfloat16
    x = tokens()
    ref16, ref32, ours = hf_logits(hf16, x), hf_logits(hf32, x), our_logits(model, x)
    noise = (ref16 - ref32).abs()
    err = (ours - ref16).abs()
    assert float(err.max()) <= 3 * float(noise.max()) and float(err.mean()) <= 3 * float(noise.mean()), (
        f"{family}: bf16 max err {float(err.max()):.3e} mean {float(err.mean()):.3e}; transformers' own "
        f"bf16 noise max {float(noise.max()):.3e} mean {float(noise.mean()):.3e}")
    assert float(err.max()) < 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_identical(saved, family):
    hf, path = saved(family)
    model, _, _ = load_hf(path)
    prompt = tokens(1, 8, seed=2)
    ours = model.generate(prompt, 32)
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 8:]
    assert theirs.shape == (1, 32)
    assert torch.equal(ours, theirs), f"{family}: ours {ours.tolist()} vs transformers {theirs.tolist()}"


@pytest.mark.parametrize("family,streamed,policy", [("mixtral", False, "lru"), ("mixtral", True, "predictive"),
                                                     ("qwen2_moe", True, "lru"), ("olmoe", True, "lfu"),
                                                     ("qwen3_moe", True, "predictive")])
def test_expert_cache_engine_at_25_percent_generates_the_same(saved, family, streamed, policy):
    """Greedy tokens through offload.ExpertCacheEngine with slots for 25% of the experts equal
    transformers' own. streamed: experts go straight from the shards into the host store
    (load_experts=False + iter_hf_expert_tensors), never into ExpertBanks."""
    engine_mod = pytest.importorskip("moe_runtime.offload.engine")
    from moe_runtime.offload.store import ExpertLayout, HostExpertStore
    hf, path = saved(family)
    model, run, _ = load_hf(path, load_experts=not streamed)
    m = run.model
    total = m.num_moe_layers * m.moe.num_experts
    store = None
    if streamed:
        layout = ExpertLayout(num_layers=m.num_moe_layers, num_experts=m.moe.num_experts, d_model=m.d_model,
                              d_expert=m.moe.d_expert, dtype=model.embed.weight.dtype)
        store = HostExpertStore(layout, pin=False)
        for l, e, w13, w2 in iter_hf_expert_tensors(path):
            store.w13(l, e).copy_(w13)
            store.w2(l, e).copy_(w2)
    engine = engine_mod.ExpertCacheEngine(model, gpu_expert_slots=total // 4, policy=policy, device="cpu",
                                          store=store)
    prompt = tokens(1, 8, seed=2)
    result = engine.generate(prompt, 32)
    assert result.report["cache_fraction"] == 0.25 and result.report["slots"] == total // 4
    ours = result.tokens
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 8:]
    assert torch.equal(ours, theirs), f"{family}: engine {ours.tolist()} vs transformers {theirs.tolist()}"


# ---------------------------------------------------------------- export
@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip(saved, tmp_path, family):
    """HF -> ours -> export: the same tensor names as save_pretrained, and transformers gives the same logits."""
    hf, path = saved(family)
    model, run, _ = load_hf(path)
    out = export_hf(model, run, tmp_path / "export", family)
    assert st_keys(out) == st_keys(path)
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf)
    x = tokens()
    assert torch.equal(hf_logits(back, x), hf_logits(hf, x))


def test_export_fused_sharded_bf16(saved, tmp_path):
    hf, path = saved("mixtral")
    model, run, _ = load_hf(path)
    out = export_hf(model, run, tmp_path / "export", "mixtral", dtype=torch.bfloat16, expert_layout="fused",
                    max_shard_bytes=20_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in st_keys(out))
    back, _, _ = load_hf(out)
    assert back.embed.weight.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.named_parameters(), back.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    x = tokens()
    assert torch.equal(our_logits(back, x).argmax(-1), hf_logits(theirs, x).argmax(-1))


@pytest.mark.parametrize("kw,family", [
    # shared expert + gate, q/k/v bias, a dense first layer, top_k=1 (renormalised weight 1.0)
    (dict(moe=dict(num_experts=4, top_k=1, d_expert=24, num_shared_experts=2, d_shared_expert=32,
                   shared_expert_gate=True), qkv_bias=True, first_dense_layers=1, n_layers=3, d_dense_ffn=40),
     "qwen2_moe"),
    (dict(moe=dict(num_experts=4, top_k=2, d_expert=24), tie_embeddings=True, n_kv_heads=2), "mixtral"),
    (dict(moe=dict(num_experts=4, top_k=3, d_expert=24, norm_topk_prob=False), qk_norm="full"), "olmoe"),
])
def test_export_our_model(tmp_path, kw, family):
    """A model trained here (random init) exports as the family that represents it exactly."""
    kw = dict(kw)
    cfg = ModelConfig(d_model=32, n_layers=kw.pop("n_layers", 2), n_heads=4, vocab_size=V, max_seq_len=64,
                      moe=MoEConfig(**kw.pop("moe")), init_std=0.05, **kw)
    torch.manual_seed(3)
    model = MoETransformer(cfg).eval()
    out = export_hf(model, RunConfig(name="ours", model=cfg), tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = tokens()
    assert_close(hf_logits(theirs, x), our_logits(model, x), torch.float32, what=f"export as {family}")
    back, run, _ = load_hf(out)
    assert run.model.moe.num_shared_experts == (1 if family == "qwen2_moe" else 0)
    assert_close(our_logits(back, x), our_logits(model, x), torch.float32, what="reload")


def test_export_refuses_what_transformers_cannot_represent(tmp_path):
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=V, max_seq_len=64,
                      moe=MoEConfig(num_experts=4, top_k=2, d_expert=24, score_func="sigmoid"))
    model = MoETransformer(cfg)
    with pytest.raises(ValueError, match=r"mixtral: score_func='sigmoid'"):
        export_hf(model, RunConfig(name="x", model=cfg), tmp_path / "a")
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=V, max_seq_len=64,
                      moe=MoEConfig(num_experts=4, top_k=2, d_expert=24, aux_free_bias=True))
    model = MoETransformer(cfg)
    model.moe_layers()[0].router.bias_E[1] = 0.5
    with pytest.raises(ValueError, match="aux-free selection biases"):
        export_hf(model, RunConfig(name="x", model=cfg), tmp_path / "b")
    with pytest.raises(ValueError, match=r"cannot be exported as olmoe: qk_norm=None \(needs 'full'\)"):
        export_hf(model, RunConfig(name="x", model=cfg), tmp_path / "c", "olmoe")


# ---------------------------------------------------------------- the expert stream
@pytest.mark.parametrize("fused", [False, True])
def test_iter_hf_expert_tensors_matches_loaded_banks(saved, tmp_path, fused):
    hf, _ = saved("qwen2_moe")  # layer 0 dense: MoE layer l is block l + 1
    hf.save_pretrained(tmp_path, save_original_format=not fused)
    model, run, _ = load_hf(tmp_path)
    banks = [layer.experts for layer in model.moe_layers()]
    seen = []
    for l, e, w13, w2 in iter_hf_expert_tensors(tmp_path):
        assert torch.equal(w13, banks[l].w13_EDF2[e]) and torch.equal(w2, banks[l].w2_EFD[e]), (l, e)
        assert w13.is_contiguous() and w2.is_contiguous()
        seen.append((l, e))
    assert seen == [(l, e) for l in range(run.model.num_moe_layers) for e in range(4)]
    # The same tensors as transformers' experts: block 1's expert 2 gate rows.
    gate_up = hf.model.layers[1].mlp.experts.gate_up_proj[2]  # [2F, D] rows [gate; up]
    assert torch.equal(banks[0].w13_EDF2[2], gate_up.detach().T)


def test_load_without_experts_leaves_them_on_meta(saved):
    _, path = saved("mixtral")
    full, _, _ = load_hf(path)
    lean, _, _ = load_hf(path, load_experts=False)
    for (name, a), (_, b) in zip(full.named_parameters(), lean.named_parameters()):
        if ".experts." in name:
            assert b.is_meta, name
        else:
            assert torch.equal(a, b), name


# ---------------------------------------------------------------- fine-tuning
def test_finetune_losses_match_transformers(tmp_path):
    """Trainer.from_hf with a constant lr, no clipping, no decay, balance loss off == a plain AdamW loop
    over transformers' model on the same batches (aux loss off: output_router_logits=False)."""
    hf = hf_model("mixtral", router_aux_loss_coef=0.0, output_router_logits=False)
    hf.save_pretrained(tmp_path / "ckpt")
    seq = torch.arange(3000) * 7 % V  # a learnable sequence: next = prev + 7 (mod V)
    corpus = Corpus(seq[:2700], seq[2700:], "arithmetic", V)
    tc = TrainConfig(max_steps=5, batch_size=2, seq_len=16, lr=1e-2, min_lr_ratio=1.0, warmup_steps=0,
                     weight_decay=0.0, beta1=0.9, beta2=0.95, grad_clip=0.0, device="cpu", eval_interval=100,
                     log_interval=100, ckpt_interval=0)
    trainer = Trainer.from_hf(tmp_path / "ckpt", tc, corpus=corpus, out_dir=tmp_path / "run", progress=False,
                              plots=False)
    assert trainer.mcfg.moe.balance_coef == 0 and trainer.mcfg.moe.z_loss_coef == 0
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    hf.train()
    ours, theirs = [], []
    for step in range(tc.max_steps):
        (x, y), = trainer.batches(step)
        loss = F.cross_entropy(hf(input_ids=x).logits.float().reshape(-1, V), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        theirs.append(float(loss.detach()))
        ours.append(trainer.train_step()["loss"])
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert ours[-1] < ours[0] - 0.1, f"fine-tuning did not learn: {ours}"


def test_from_hf_overrides_only_training_fields(saved, tmp_path):
    _, path = saved("olmoe")
    corpus = Corpus(torch.arange(500) % V, torch.arange(100) % V, "ramp", V)
    tc = TrainConfig(max_steps=1, batch_size=2, seq_len=16, device="cpu", eval_interval=10, log_interval=10)
    t = Trainer.from_hf(path, tc, corpus=corpus, out_dir=tmp_path, progress=False, plots=False,
                        moe_overrides={"balance_coef": 0.02, "balance_scope": "micro_batch"})
    assert (t.mcfg.moe.balance_coef, t.mcfg.moe.balance_scope, t.mcfg.qk_norm) == (0.02, "micro_batch", "full")
    ref, _, _ = load_hf(path)
    assert torch.equal(t.model.blocks[1].ffn.experts.w2_EFD, ref.blocks[1].ffn.experts.w2_EFD)
    with pytest.raises(ValueError, match=r"moe_overrides \['top_k'\] would change the checkpoint's math"):
        Trainer.from_hf(path, tc, corpus=corpus, out_dir=tmp_path, moe_overrides={"top_k": 1})


# ---------------------------------------------------------------- tokenizer
def _word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return tok


def test_tokenizer_json_is_used(saved, tmp_path):
    _, path = saved("mixtral")
    ck = tmp_path / "ck"
    shutil.copytree(path, ck)
    _word_tokenizer().save(str(ck / "tokenizer.json"))
    model, _, tok = load_hf(ck)
    ids = tok.encode("the cat sat on the mat").ids
    assert ids == [1, 2, 3, 4, 1, 5]
    out = model.generate(torch.tensor([ids]), 4)[0].tolist()
    assert isinstance(tok.decode(out), str)
    text = tmp_path / "story.txt"
    text.write_text("the cat sat on the mat a dog ran " * 20)
    trainer = Trainer.from_hf(ck, TrainConfig(max_steps=1, batch_size=1, seq_len=8, device="cpu"),
                              data=text, out_dir=tmp_path / "run", progress=False, plots=False)
    assert "tokenizer.json" in trainer.corpus.source
    assert trainer.corpus.train[:9].tolist() == [1, 2, 3, 4, 1, 5, 6, 7, 8]
    (ck / "tokenizer.json").write_text("{not json")
    with pytest.raises(HFCheckpointError, match=r"tokenizer\.json: not a valid tokenizers file"):
        load_hf(ck)


# ---------------------------------------------------------------- malformed directories
def _edit_config(path: Path, **changes) -> None:
    d = json.loads((path / "config.json").read_text())
    d.update(changes)
    (path / "config.json").write_text(json.dumps(d))


def _edit_tensors(file: Path, fn) -> None:
    tensors = safetensors_torch.load_file(str(file))
    fn(tensors)
    safetensors_torch.save_file(tensors, str(file), metadata={"format": "pt"})


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[:-100])


Q0 = "model.layers.0.self_attn.q_proj.weight"
CASES = {
    "missing shard": (lambda p: sorted(p.glob("model-*.safetensors"))[1].unlink(),
                      r"model-00002-of-\d{5}\.safetensors: shard file is missing \(model\.safetensors\.index"),
    "wrong dtype": (lambda p: _edit_tensors(p / "model.safetensors", lambda t: t.update({Q0: t[Q0].half()})),
                    r"model\.safetensors: tensor model\.layers\.0\.self_attn\.q_proj\.weight has dtype F16, "
                    r"but config\.json field dtype='float32' says float32"),
    "truncated": (lambda p: _truncate(p / "model.safetensors"),
                  r"model\.safetensors: not a readable safetensors file .*truncated"),
    "activation": (lambda p: _edit_config(p, hidden_act="gelu"),
                   r"config\.json: field hidden_act='gelu' is not supported"),
    "architecture": (lambda p: _edit_config(p, architectures=["LlamaForCausalLM"]),
                     r"config\.json: field architectures=\['LlamaForCausalLM'\] is not supported"),
    "model_type": (lambda p: _edit_config(p, model_type="llama"),
                   r"config\.json: field model_type='llama' does not match MixtralForCausalLM"),
    "missing tensor": (lambda p: _edit_tensors(p / "model.safetensors", lambda t: t.pop(Q0)),
                       r"tensor\(s\) that config\.json implies are in no shard: \['" + Q0.replace(".", r"\.")),
    "unexpected tensor": (lambda p: _edit_tensors(p / "model.safetensors",
                                                  lambda t: t.update({"model.layers.0.extra": torch.zeros(2)})),
                          r"model\.safetensors: unexpected tensor\(s\) \['model\.layers\.0\.extra'\]"),
    "shape": (lambda p: _edit_config(p, intermediate_size=20),
              r"tensor model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight has shape \[24, 32\], "
              r"but config\.json implies \[20, 32\]"),
    "rope scaling": (lambda p: _edit_config(p, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                     r"config\.json: field rope_scaling=.*only plain RoPE"),
    "sliding window": (lambda p: _edit_config(p, sliding_window=64),
                       r"config\.json: field sliding_window=64 is smaller than the longest sequence "
                       r"\(max_position_embeddings=128\)"),
    "unknown field": (lambda p: _edit_config(p, attn_logit_softcapping=30.0),
                      r"config\.json: unknown field\(s\) \['attn_logit_softcapping'\]"),
    "head_dim": (lambda p: _edit_config(p, head_dim=7), r"config\.json: field head_dim=7 must be even"),
    "jitter": (lambda p: _edit_config(p, router_jitter_noise=0.1), r"field router_jitter_noise=0\.1"),
    "missing field": (lambda p: _edit_config(p, hidden_size=None), r"required field 'hidden_size' is missing"),
    "field type": (lambda p: _edit_config(p, num_hidden_layers="2"),
                   r"config\.json: field num_hidden_layers='2' should be of type int"),
    "pickle": (lambda p: ((p / "model.safetensors").rename(p / "pytorch_model.bin")),
               r"no model\.safetensors .*pickle checkpoints \(pytorch_model\.bin\) are refused"),
}


@pytest.mark.parametrize("case", CASES)
def test_malformed_directory_names_file_and_field(saved, tmp_path, case):
    hf, _ = saved("mixtral")
    if case == "missing shard":
        hf.save_pretrained(tmp_path, max_shard_size="40KB")
    else:
        hf.save_pretrained(tmp_path)
    mutate, pattern = CASES[case]
    mutate(tmp_path)
    with pytest.raises(HFCheckpointError, match=pattern):
        load_hf(tmp_path)


def test_refusals_that_have_a_way_out(saved, tmp_path):
    """A sliding window loads when max_seq_len stays inside it; an unknown field when the caller vouches."""
    hf, path = saved("mixtral")
    shutil.copytree(path, tmp_path / "a")
    _edit_config(tmp_path / "a", sliding_window=64, attn_logit_softcapping=None)
    with pytest.raises(HFCheckpointError, match="unknown field"):
        load_hf(tmp_path / "a", max_seq_len=64)
    model, run, _ = load_hf(tmp_path / "a", max_seq_len=64, ignore_config_fields=("attn_logit_softcapping",))
    assert run.model.max_seq_len == 64
    x = tokens()
    assert_close(our_logits(model, x), hf_logits(hf, x), torch.float32, what="inside the window")


@pytest.mark.parametrize("family,changes,pattern", [
    ("qwen2_moe", dict(decoder_sparse_step=2, mlp_only_layers=[]),
     r"decoder_sparse_step=2, mlp_only_layers=\[\] make layers \[0, 2\] dense; .*leading block"),
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=16), r"field sliding_window=16 is smaller"),
    ("olmoe", dict(clip_qkv=8.0), r"config\.json: field clip_qkv=8\.0 is not supported"),
    ("olmoe", dict(attention_bias=True), r"field attention_bias=True is not supported"),
    ("qwen3_moe", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     r"field rope_parameters=.*only plain RoPE"),
])
def test_family_specific_refusals(saved, tmp_path, family, changes, pattern):
    _, path = saved(family)
    shutil.copytree(path, tmp_path / "ck")
    _edit_config(tmp_path / "ck", **changes)
    with pytest.raises(HFCheckpointError, match=pattern):
        read_hf(tmp_path / "ck")


def test_moe_generate_hf_cli_matches_transformers(saved, tmp_path, capsys):
    """`moe generate --hf DIR`: experts streamed into the host store, 25% slots, same greedy tokens."""
    from moe_runtime.core.cli import main
    hf, path = saved("mixtral")
    out = tmp_path / "report.json"
    assert main(["generate", "--hf", str(path), "--gpu-expert-slots", "2", "--prompt-ids", "5,17,42,8",
                 "--max-new-tokens", "12", "--device", "cpu", "--json", str(out)]) == 0
    ours = json.loads(out.read_text())["tokens"][0]
    prompt = torch.tensor([[5, 17, 42, 8]])
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 4:]
    assert ours == theirs.tolist()
    assert main(["generate", "--hf", str(path), "--gpu-expert-slots", "2", "--device", "cpu"]) == 2
    assert "not a byte-level model; pass --prompt-ids" in capsys.readouterr().err


def test_moe_generate_hf_cli_uses_tokenizer_json(saved, tmp_path, capsys):
    from moe_runtime.core.cli import main
    hf, path = saved("mixtral")
    ck = tmp_path / "ck"
    shutil.copytree(path, ck)
    tok = _word_tokenizer()
    tok.save(str(ck / "tokenizer.json"))
    out = tmp_path / "r.json"
    assert main(["generate", "--hf", str(ck), "--gpu-expert-slots", "3", "--prompt", "the cat sat",
                 "--max-new-tokens", "6", "--device", "cpu", "--json", str(out)]) == 0
    ours = json.loads(out.read_text())["tokens"][0]
    theirs = hf.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, 3:].tolist()
    assert ours == theirs
    assert capsys.readouterr().out.splitlines()[0] == tok.decode([1, 2, 3] + ours)
