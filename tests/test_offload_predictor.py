"""Routing predictors on a briefly trained tiny model (40 Trainer steps per router position), its
routing traces recorded during training, and the `moe generate` / `moe trace` commands on its
checkpoint."""
from __future__ import annotations

import json

import pytest
import torch

from moe_runtime.core.cli import main
from moe_runtime.core.train import Trainer, load_model
from moe_runtime.offload.engine import ExpertCacheEngine
from moe_runtime.offload.evaluate import evaluate_predictors, format_comparison
from moe_runtime.offload.predictor import LearnedPredictor, PredictionStats
from moe_runtime.offload.trace import RoutingTrace, recorder_for
from tests.test_offload_support import (assert_logits_match, resident_generate, single_thread,  # noqa: F401
                                        small_corpus, small_run)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{position: (model, run_dir, trace recorded over the last training steps, held-out tokens)}."""
    corpus, out = small_corpus(), {}
    held_out = torch.cat([corpus.batch("val", 100 + i, 4, 64)[0] for i in range(2)])
    for pos in ("post_attention", "pre_attention"):
        run = small_run(pos)
        run.model.moe.balance_scope = "micro_batch"  # one forward per micro-batch: no routing pre-pass
        run_dir = tmp_path_factory.mktemp(pos)
        trainer = Trainer(run, out_dir=run_dir, corpus=corpus, progress=False, plots=False)
        trainer.fit(until_step=34)
        with recorder_for(trainer.model, meta={"source": "training"}).attach(trainer.model) as rec:
            trainer.fit()
        out[pos] = (trainer.model.eval(), run_dir, rec.to_trace(), held_out)
    return out


def test_trace_recorded_during_training(trained):
    _, _, trace, _ = trained["post_attention"]
    assert trace.meta["source"] == "training" and trace.num_layers == 3
    assert len(trace) == 7 * 8 * 32 * 3, "6 training steps and the final evaluation, 8 x 32 tokens, 3 layers"


@pytest.mark.parametrize("pos", ["post_attention", "pre_attention"])
def test_predictor_precision_recall_on_trained_model(trained, pos):
    model, _, trace, held_out = trained[pos]
    learned = LearnedPredictor.fit(trace, depth=1)
    assert learned.losses[1] < 0.6 * learned.losses[0], f"learned predictor did not train: {learned.losses}"
    res = evaluate_predictors(model, held_out, depth=1, learned=learned)
    print(format_comparison(res))
    chance = res["chance"]
    look, lrn = res["lookahead"], res["learned"]
    assert set(look["per_distance"]) == {"0", "1"} and set(look["per_layer"]) == {"0", "1", "2"}
    for d in ("0", "1"):
        assert look["per_distance"][d]["precision"] > chance + 0.25, f"lookahead d={d}: {look['per_distance'][d]}"
        assert lrn["per_distance"][d]["precision"] > chance + 0.15, f"learned d={d}: {lrn['per_distance'][d]}"
    if pos == "pre_attention":
        assert res["exact"]["precision"] == 1.0 and res["exact"]["recall"] == 1.0
        assert look["per_distance"]["0"]["precision"] == 1.0, "pre-attention routing is known at block entry"
    else:
        assert res["exact"] is None


def test_prediction_stats_arithmetic():
    st = PredictionStats()
    st.update(0, 0, {1, 2}, {2, 3})
    st.update(1, 1, {4}, {4})
    s = st.summary()
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["per_layer"]["0"] == {"precision": 0.5, "recall": 0.5}
    assert s["per_distance"]["1"] == {"precision": 1.0, "recall": 1.0}


@pytest.mark.parametrize("pos", ["post_attention", "pre_attention"])
def test_engine_on_trained_checkpoint_matches_resident(trained, pos):
    _, run_dir, trace, _ = trained[pos]
    resident = load_model(run_dir)[0]
    prompt = torch.tensor([list(b"def main(")] * 2)
    want, want_logits = resident_generate(resident, prompt, 12)
    for predictor in ("auto", LearnedPredictor.fit(trace, depth=1, steps=100)):
        engine = ExpertCacheEngine(load_model(run_dir)[0], gpu_expert_slots=5, policy="predictive",
                                   predictor=predictor, device="cpu")
        res = engine.generate(prompt, 12, return_logits=True)
        assert torch.equal(res.tokens, want)
        assert_logits_match(res.logits, want_logits, resident.cfg)
        p = res.report["prediction"]
        assert p["precision"] is not None and p["recall"] is not None


def test_generate_command(trained, tmp_path, capsys):
    _, run_dir, _, _ = trained["pre_attention"]
    out = tmp_path / "gen.json"
    args = ["generate", "--checkpoint", str(run_dir), "--gpu-expert-slots", "6", "--policy", "predictive",
            "--cpu-experts", "--prompt", "def ", "--max-new-tokens", "8", "--device", "cpu", "--json", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    first = text.splitlines()[0]
    assert first.startswith("def ") and "hit rate" in text and "bytes moved" in text and "precision" in text
    rep = json.loads(out.read_text())
    assert rep["policy"] == "predictive" and rep["cpu_experts"] and rep["new_tokens"] == 8
    for key in ("tokens_per_s", "hit_rate", "bytes_moved", "stall_s", "prediction", "calibration"):
        assert key in rep
    assert main(["generate", "--checkpoint", str(run_dir), "--gpu-expert-slots", "2", "--prompt-ids", "300",
                 "--device", "cpu"]) == 2
    assert "outside [0, 256)" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(run_dir), "--gpu-expert-slots", "2", "--max-new-tokens", "500",
                 "--device", "cpu"]) == 2
    assert "exceeds the model's max_seq_len=128" in capsys.readouterr().err


def test_trace_record_simulate_and_predictors_commands(trained, tmp_path, capsys):
    _, run_dir, _, _ = trained["post_attention"]
    tr = tmp_path / "gen.msgpack"
    assert main(["trace", "record", "--checkpoint", str(run_dir), "--out", str(tr), "--max-new-tokens", "16",
                 "--batch", "2", "--device", "cpu"]) == 0
    trace = RoutingTrace.load(tr)
    assert len(trace) == (2 * 4 + 2 * 15) * 3 and "calibration" in trace.meta
    assert main(["trace", "simulate", str(tr), "--capacities", "4,12"]) == 0
    assert "predictive" in capsys.readouterr().out
    data = tmp_path / "val.txt"
    data.write_text(bytes(small_corpus().val.tolist()).decode("utf-8", "replace"))
    out = tmp_path / "pred.json"
    assert main(["trace", "predictors", "--checkpoint", str(run_dir), "--trace", str(tr), "--batches", "1",
                 "--data", str(data), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["lookahead"]["precision"] > res["chance"] and res["learned"]["precision"] is not None
    assert "lookahead: precision" in capsys.readouterr().out


def test_trace_record_default_length_fills_the_context(trained, tmp_path, capsys):
    model, run_dir, _, _ = trained["post_attention"]
    tr = tmp_path / "full.msgpack"
    assert main(["trace", "record", "--checkpoint", str(run_dir), "--out", str(tr), "--device", "cpu"]) == 0
    L, S = model.cfg.num_moe_layers, model.cfg.max_seq_len
    assert len(RoutingTrace.load(tr)) == (S - 1) * L  # prompt "def " + new tokens = max_seq_len, last one not run
    assert main(["trace", "record", "--checkpoint", str(run_dir), "--out", str(tr), "--max-new-tokens", "999",
                 "--device", "cpu"]) == 2
    assert "leaves room for 1 to" in capsys.readouterr().err


def test_predictive_is_never_worse_than_lru_on_repetitive_greedy_decoding(trained):
    """Greedy decoding of a briefly trained model repeats itself, so "the last token's experts" is the
    best guess; the calibrated recency boost (offload/eviction.py) must keep wrong prefetches from
    evicting them."""
    _, run_dir, _, _ = trained["post_attention"]
    model = load_model(run_dir)[0]
    total = model.cfg.num_moe_layers * model.cfg.moe.num_experts
    prompt = torch.tensor([list(b"def ")])
    hits = {}
    for policy in ("lru", "predictive"):
        engine = ExpertCacheEngine(load_model(run_dir)[0], gpu_expert_slots=total // 4, policy=policy, device="cpu")
        hits[policy] = engine.generate(prompt, 60).report["hit_rate"]
    assert hits["predictive"] >= hits["lru"] - 0.02, hits
