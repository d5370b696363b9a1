import json

import pytest
import torch

from moe_runtime.core.checkpoint import latest_checkpoint
from moe_runtime.core.data import load_corpus
from moe_runtime.core.train import Trainer, lr_at, load_model
from tests.helpers import small_moe, small_run

CORPUS = None


def corpus():
    global CORPUS
    if CORPUS is None:
        CORPUS = load_corpus()
    return CORPUS


def _losses(tr):
    return [h["loss"] for h in tr.history if "loss" in h]


@pytest.mark.parametrize("moe_kw", [dict(balance_scope="global_batch", global_sync="exact"),
                                    dict(balance_scope="global_batch", global_sync="cumulative", aux_free_bias=True)])
def test_resume_continues_identically(tmp_path, moe_kw):
    run = small_run(moe=small_moe(**moe_kw))
    a = Trainer(run, out_dir=tmp_path / "a", corpus=corpus(), progress=False, plots=False)
    a.fit()
    b = Trainer(run, out_dir=tmp_path / "b", corpus=corpus(), progress=False, plots=False)
    b.fit(until_step=3)
    b2 = Trainer(run, out_dir=tmp_path / "b", corpus=corpus(), progress=False, plots=False)
    b2.fit()
    assert _losses(b)[:3] == _losses(a)[:3]
    assert _losses(b2) == _losses(a)[3:], "resumed run diverged from the uninterrupted one"
    for (n, p), q in zip(a.model.named_parameters(), b2.model.parameters()):
        assert torch.equal(p, q), n


def test_resume_skips_corrupted_latest(tmp_path):
    run = small_run(max_steps=4, ckpt_interval=2)
    t = Trainer(run, out_dir=tmp_path, corpus=corpus(), progress=False, plots=False)
    t.fit()
    newest = latest_checkpoint(t.ckpt_root)
    f = newest / "model-rank00000.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert latest_checkpoint(t.ckpt_root).name == "step_00000002"
    model, cfg, ck = load_model(tmp_path)
    assert ck.step == 2


def test_metrics_plots_and_eval(tmp_path):
    run = small_run(max_steps=3, eval_interval=3)
    t = Trainer(run, out_dir=tmp_path, corpus=corpus(), progress=False)
    summary = t.fit()
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ev = [l for l in lines if l.get("event") == "eval"]
    assert ev and {"val_loss", "val_ppl", "load_max_over_mean", "load_cv"} <= set(ev[-1])
    assert (tmp_path / "plots" / "expert_load_latest.png").stat().st_size > 1000
    assert summary["last_eval"]["val_ppl"] == pytest.approx(torch.tensor(ev[-1]["val_loss"]).exp().item())


def test_training_beats_unigram_baseline(tmp_path):
    run = small_run(max_steps=120, eval_interval=120, ckpt_interval=0, batch_size=16, seq_len=32, grad_accum=1,
                    lr=5e-3, warmup_steps=10, model=dict(d_model=64))
    t = Trainer(run, out_dir=tmp_path, corpus=corpus(), progress=False, plots=False)
    first = t.evaluate()["val_loss"]
    res = t.fit()["last_eval"]
    base = corpus().unigram_entropy()
    assert first > base, (first, base)
    assert res["val_loss"] < base - 0.2, f"val {res['val_loss']:.3f} vs unigram {base:.3f}"


def test_lr_schedule_shape():
    from moe_runtime.core.config import TrainConfig
    c = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, c) == pytest.approx(0.1) and lr_at(9, c) == pytest.approx(1.0)
    assert lr_at(100, c) == pytest.approx(0.1) and lr_at(55, c) == pytest.approx(0.55)


def test_seq_len_over_max_refused(tmp_path):
    run = small_run(seq_len=64)
    with pytest.raises(ValueError, match="seq_len=64 exceeds the model's max_seq_len=32"):
        Trainer(run, out_dir=tmp_path, corpus=corpus(), progress=False)


def test_default_tiny_budget_beats_unigram_by_a_wide_margin(tmp_path):
    """The acceptance run of `moe train` with no arguments (tiny preset, its full default budget)."""
    from moe_runtime.core.config import get_preset
    run = get_preset("tiny")
    run.train.device = "cpu"
    t = Trainer(run, out_dir=tmp_path, corpus=corpus(), progress=False, plots=False)
    ev = t.fit()["last_eval"]
    base = corpus().unigram_entropy()
    assert ev["val_loss"] < base - 1.0, f"val {ev['val_loss']:.3f} vs unigram {base:.3f}"


def test_fit_on_a_finished_run_still_reports_its_evaluation(tmp_path):
    run = small_run(max_steps=2, eval_interval=2, ckpt_interval=2)
    first = Trainer(run, out_dir=tmp_path, corpus=corpus(), progress=False, plots=False).fit()
    again = Trainer(run, out_dir=tmp_path, corpus=corpus(), progress=False, plots=False).fit()
    assert again["step"] == 2 and again["last_eval"]["val_loss"] == pytest.approx(first["last_eval"]["val_loss"])


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_losses_grads_and_counts(tmp_path, mode):
    """Recomputing blocks (routing included) or attention in backward changes no loss, no gradient
    and no expert count: the exact global-batch counts never include a recompute."""
    def one_step(ac: str):
        run = small_run(moe=small_moe(balance_scope="global_batch", global_sync="exact", balance_coef=0.1),
                        activation_checkpointing=ac)
        t = Trainer(run, out_dir=tmp_path / ac, corpus=corpus(), progress=False, plots=False)
        parts = t.forward_backward(t.batches(0))
        grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}
        return [float(p.total.detach()) for p in parts], grads, t.tracker.end_step()
    l0, g0, c0 = one_step("none")
    l1, g1, c1 = one_step(mode)
    assert l0 == l1, (l0, l1)
    assert torch.equal(c0, c1) and int(c1.sum()) == 2 * 2 * 2 * 16 * 2  # layers x micro x batch x seq x top_k
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-7, rtol=1e-6), f"{mode}: {n} max err {(g0[n] - g1[n]).abs().max()}"


def test_exact_prepass_skipped_with_one_micro_batch_on_one_rank(tmp_path):
    """One micro-batch on one rank: the exact global batch is the micro-batch, so the routing pre-pass
    is skipped, and training is bit for bit what the pre-pass path gives."""
    from moe_runtime.core.router import BalanceTracker
    run = small_run(grad_accum=1, max_steps=2, moe=small_moe(balance_scope="global_batch", global_sync="exact"))
    a = Trainer(run, out_dir=tmp_path / "a", corpus=corpus(), progress=False, plots=False)
    assert not a.tracker.needs_prepass
    b = Trainer(run, out_dir=tmp_path / "b", corpus=corpus(), progress=False, plots=False)
    b.tracker = BalanceTracker(run.model.moe, run.model.num_moe_layers)  # the pre-pass path
    assert b.tracker.needs_prepass
    for _ in range(2):
        ma, mb = a.train_step(), b.train_step()
        assert ma["loss"] == mb["loss"] and ma["balance_loss"] == mb["balance_loss"]
        assert torch.equal(ma["counts"], mb["counts"])
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
