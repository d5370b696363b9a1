"""Hugging Face side of issue #12: transformers' pooled router aux loss, and an export that writes
back every config field transformers uses (load -> export -> load identical, generate() alike)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from moe_runtime.core.config import TrainConfig  # noqa: E402
from moe_runtime.core.data import Corpus  # noqa: E402
from moe_runtime.core.hf import export_hf, load_hf  # noqa: E402
from moe_runtime.core.train import Trainer  # noqa: E402
from moe_runtime.core.router import balance_loss  # noqa: E402
from moe_runtime.core.train import micro_batch_loss  # noqa: E402
from tests.helpers import single_thread  # noqa: F401,E402  (autouse: one torch thread)

V = 64


def qwen2_moe(tmp_path, **kw):
    cfg = transformers.Qwen2MoeConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=40, moe_intermediate_size=24,
                                      shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                                      max_position_embeddings=64, mlp_only_layers=[0], initializer_range=0.2, **kw)
    torch.manual_seed(0)
    model = transformers.Qwen2MoeForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    return model


def test_finetuning_balance_loss_equals_transformers_pooled_aux_loss(tmp_path):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func
    coef = 0.02
    hf = qwen2_moe(tmp_path / "ckpt", output_router_logits=True, router_aux_loss_coef=coef)
    seq = torch.arange(2000) * 7 % V
    tc = TrainConfig(max_steps=2, batch_size=2, seq_len=16, device="cpu", eval_interval=100, ckpt_interval=0)
    trainer = Trainer.from_hf(tmp_path / "ckpt", tc, corpus=Corpus(seq[:1800], seq[1800:], "arith", V),
                              out_dir=tmp_path / "run", progress=False, plots=False)
    m = trainer.mcfg.moe
    assert (m.balance_pooling, m.balance_scope, m.balance_coef) == ("pooled", "micro_batch", pytest.approx(coef * 2))
    (x, y), = trainer.batches(0)
    trainer.tracker.begin_step()
    ours = micro_batch_loss(trainer.model, x, y, trainer.tracker)
    with torch.no_grad():
        out = hf(input_ids=x, output_router_logits=True)
    aux = load_balancing_loss_func(out.router_logits, 4, 2)
    theirs_total = F.cross_entropy(out.logits.float().reshape(-1, V), y.reshape(-1)) + coef * aux
    assert float(m.balance_coef * ours.balance) == pytest.approx(float(coef * aux), rel=1e-5)
    assert float(ours.total.detach()) == pytest.approx(float(theirs_total), rel=1e-5)
    # The per-layer mean of products is a different number: the equality above can fail.
    with torch.no_grad():
        routing = trainer.model(x).routing
    probs, counts = torch.stack([r.probs_mean_E for r in routing]), torch.stack([r.counts_E for r in routing])
    assert float(balance_loss(probs, counts, pooled=True)) == pytest.approx(float(ours.balance), rel=1e-6)
    assert float(balance_loss(probs, counts)) != pytest.approx(float(ours.balance), rel=1e-4)


def test_export_writes_back_token_ids_and_aux_coef_and_generate_stops_alike(tmp_path):
    hf = qwen2_moe(tmp_path / "probe")
    prompt = torch.tensor([[3, 9, 27, 17]])
    probe = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    eos = int(probe[0, prompt.shape[1] + 2])  # the 3rd generated token: the original must stop there
    hf = qwen2_moe(tmp_path / "orig", bos_token_id=1, eos_token_id=eos, pad_token_id=0, router_aux_loss_coef=0.013,
                   output_router_logits=False)
    model, run, _ = load_hf(tmp_path / "orig")
    export_hf(model, run, tmp_path / "export")
    back, run2, _ = load_hf(tmp_path / "export")
    assert (run2.model, run2.train) == (run.model, run.train)  # the name is the directory's
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("orig", "export"))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "router_aux_loss_coef", "output_router_logits",
                "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps", "use_sliding_window",
                "sliding_window", "max_window_layers", "norm_topk_prob", "mlp_only_layers", "decoder_sparse_step"):
        assert b.get(key) == a.get(key), key
    ta, tb = (transformers.AutoConfig.from_pretrained(tmp_path / d).to_dict() for d in ("orig", "export"))
    skip = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}
    assert {k: v for k, v in ta.items() if k not in skip} == {k: v for k, v in tb.items() if k not in skip}
    outs = [transformers.AutoModelForCausalLM.from_pretrained(tmp_path / d).eval().generate(
        prompt, max_new_tokens=8, do_sample=False) for d in ("orig", "export")]
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape[1] <= prompt.shape[1] + 3 and int(outs[0][0, -1]) == eos, "stopped at its EOS token"


def test_hf_index_paths_outside_the_directory_are_refused(tmp_path):
    from moe_runtime.core.hf import HFCheckpointError, read_hf
    qwen2_moe(tmp_path / "ckpt")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../elsewhere/model.safetensors"}}
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HFCheckpointError, match=r"index.json: shard '../elsewhere/model.safetensors' .* not a plain"):
        read_hf(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1]}))
    with pytest.raises(HFCheckpointError, match=r"weight_map must map tensor names"):
        read_hf(tmp_path / "ckpt")
