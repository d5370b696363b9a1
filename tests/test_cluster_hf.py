"""Fine-tuning a Hugging Face checkpoint with expert parallelism: a rank reads the dense tensors and
only its own experts from the safetensors shards (per-expert tensors of other ranks are never read,
fused [E, ...] stacks are read as its rows only), what it loads equals the same slices of the
one-process model, and EP=2 through Ray Train starts from the same loss as Trainer.from_hf.
Tiny transformers models are made here (no downloads).
"""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moe_runtime.cluster.job import ClusterTrainer  # noqa: E402
from moe_runtime.cluster.layout import ClusterConfig  # noqa: E402
from moe_runtime.core.config import TrainConfig  # noqa: E402
from moe_runtime.core.hf import load_hf, load_hf_weights, read_hf  # noqa: E402
from moe_runtime.core.model import init_model  # noqa: E402
from moe_runtime.core.train import Trainer  # noqa: E402

E = 4


def save_tiny(family: str, path, fused: bool) -> None:
    """A tiny random Mixtral / Qwen3-MoE (2 layers, 4 experts, byte vocabulary) saved in `path`."""
    common = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.05,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    if family == "mixtral":
        hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(intermediate_size=24, num_local_experts=E,
                                                                         **common))
    else:
        hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            intermediate_size=40, moe_intermediate_size=24, num_experts=E, norm_topk_prob=True, **common))
    hf.save_pretrained(path, save_original_format=not fused, max_shard_size="40KB")


@pytest.mark.parametrize("family,fused", [("mixtral", False), ("qwen3_moe", True)])
def test_rank_reads_only_dense_and_its_own_experts(tmp_path, family, fused):
    save_tiny(family, tmp_path, fused)
    ck = read_hf(tmp_path)
    assert ck.layout == ("fused" if fused else "per_expert") and len(ck.files) > 1
    full, run, _ = load_hf(tmp_path, dtype=torch.float32)
    want = dict(full.named_parameters())
    for r in range(2):
        rows = slice(2 * r, 2 * r + 2)
        model = init_model(run.model, seed=0, expert_rows=rows)
        read = load_hf_weights(ck, model, expert_rows=rows)
        for name, p in model.named_parameters():
            ref = want[name][rows] if name.endswith(("w13_EDF2", "w2_EFD")) else want[name]
            assert torch.equal(p.detach(), ref.detach()), f"rank {r}: {name} differs from the one-process model"
        experts = [(n, span) for n, span in read if "experts" in n]
        assert experts, "no expert tensor read"
        assert all(span is not None and rows.start <= span[0] and span[1] <= rows.stop for _, span in experts), \
            f"rank {r} read other ranks' experts: {[x for x in experts if x[1] != (rows.start, rows.stop)][:3]}"
        if not fused:  # other experts' tensors are not even opened
            assert not any(f".experts.{e}." in n for n, _ in experts for e in range(E) if not rows.start <= e < rows.stop)
        dense = {n for n, span in read if span is None}
        assert dense == {n for n, s in ck.plan.items() if not s.param.endswith(("w13_EDF2", "w2_EFD"))}


def test_from_hf_with_tokenizer_needs_a_token_file(tmp_path):
    save_tiny("mixtral", tmp_path, fused=False)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {
        "a": 0}, "unk_token": "a"}}))
    with pytest.raises(Exception, match="token file"):
        ClusterTrainer.from_hf(tmp_path, TrainConfig(max_steps=1, batch_size=2, seq_len=8, device="cpu"),
                               ClusterConfig(workers=2, ep=2, storage=str(tmp_path / "store")), data="text.txt")


@pytest.mark.ray
def test_ep2_finetune_through_ray_train_starts_at_the_one_process_loss(ray_local, tmp_path):
    save_tiny("qwen3_moe", tmp_path / "hf", fused=False)
    cfg = TrainConfig(max_steps=2, batch_size=4, seq_len=16, grad_accum=1, lr=1e-3, warmup_steps=1, eval_interval=1000,
                      eval_batches=1, log_interval=1, ckpt_interval=0, device="cpu")
    s = ClusterTrainer.from_hf(tmp_path / "hf", cfg, ClusterConfig(workers=2, ep=2, storage=str(tmp_path / "store")),
                               progress=False, plots=False).fit(resume=False)
    ref = Trainer.from_hf(tmp_path / "hf", cfg, out_dir=tmp_path / "one", progress=False, plots=False)
    ref_hist = ref.fit(resume=False)["history"]
    got = [r["loss"] for r in s["history"] if "loss" in r and "t_step" in r]
    want = [r["loss"] for r in ref_hist if "loss" in r and "t_step" in r]
    assert len(got) == len(want) == 2
    for step, (a, b) in enumerate(zip(got, want), 1):
        assert abs(a - b) < 1e-5, f"step {step}: EP=2 loss {a} vs one process {b}"
