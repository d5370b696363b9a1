"""The CLI side of issue #12: one line on stderr and exit 2 for input / file / I/O errors, hints
that name real flags, Ctrl-C / SIGTERM during `moe train`, no silent config.json rewrite."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe_runtime.core.cli import build_parser, main
from tests.helpers import interrupt_training_at

TINY = ["--config", "examples/configs/tiny.toml", "--batch-size", "2", "--seq-len", "16", "--device", "cpu",
        "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run of the tiny config (checkpoint at step 2)."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--out", str(out), "--max-steps", "2", "--eval-interval", "2"]) == 0
    return out


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, pattern", [
    (["train", "--max-steps", "-3"], r"max_steps=-3 must be > 0 \(set by --max-steps\)"),
    (["train", "--lr", "inf"], r"lr=inf must be a finite number \(set by --lr\)"),
    (["train", "--device", "tpu"], r"device='tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    (["eval", "/nonexistent/run"], r"no valid checkpoint under /nonexistent/run"),
    (["generate", "--checkpoint", "/nonexistent/run", "--gpu-expert-slots", "2"], r"no valid checkpoint"),
    (["trace", "simulate", "/nonexistent.msgpack"], r"trace file /nonexistent.msgpack does not exist"),
])
def test_errors_are_one_line_exit_2_for_every_subcommand(argv, pattern, capsys, tmp_path):
    assert main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "train" else [])) == 2
    assert re.search(pattern, one_line(capsys))


def test_config_errors_name_file_key_value_and_expectation(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(Path("examples/configs/tiny.toml").read_text().replace("top_k = 2", 'top_k = "2"'))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert f"{cfg}: [model.moe] top_k='2' must be an int, not str" in one_line(capsys)


def test_io_errors_name_the_path(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", *TINY, "--out", str(blocker / "run"), "--max-steps", "1"]) == 2
    assert str(blocker) in one_line(capsys)

    import moe_runtime.core.checkpoint as checkpoint_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoint_mod, "save_file", full)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), "--max-steps", "1", "--eval-interval", "1"]) == 2
    err = one_line(capsys)
    assert "No space left on device" in err and str(out / "checkpoints" / ".tmp-step_00000001") in err


def test_lower_max_steps_on_a_finished_run_refuses_and_keeps_config_json(finished, capsys):
    before = (finished / "config.json").read_text()
    assert main(["train", *TINY, "--out", str(finished), "--max-steps", "1"]) == 2
    err = one_line(capsys)
    assert "past max_steps=1; pass --max-steps 2 or more to continue it, or pass --no-resume" in err
    assert "--out" in err and (finished / "config.json").read_text() == before


def test_resuming_with_another_model_suggests_no_resume_or_a_new_out(finished, capsys, tmp_path):
    other = tmp_path / "other.toml"
    other.write_text(Path("examples/configs/tiny.toml").read_text().replace("d_expert = 128", "d_expert = 64"))
    assert main(["train", *TINY, "--config", str(other), "--out", str(finished), "--max-steps", "2"]) == 2
    err = one_line(capsys)
    assert "was written for another model" in err and "--no-resume" in err and "a new --out" in err


def test_ctrl_c_prints_the_step_and_the_checkpoint_a_rerun_resumes_from(tmp_path, capsys, monkeypatch):
    interrupt_training_at(monkeypatch, 3)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), "--max-steps", "8", "--ckpt-interval", "2"]) == 130
    err = one_line(capsys)
    assert f"interrupted at step 3; rerun the same command to resume from {out / 'checkpoints' / 'step_00000002'}" in err


def test_sigterm_during_moe_train_ends_with_one_line(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen([sys.executable, "-m", "moe_runtime", "train", *TINY, "--out", str(out), "--max-steps", "100000",
                             "--ckpt-interval", "1", "--eval-interval", "100000"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step_*")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert re.fullmatch(r"moe train: interrupted at step \d+; rerun the same command to resume from .*step_\d{8}",
                        lines[-1]), err
    assert "Traceback" not in err


def test_hf_hints_name_flags_that_exist(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                     num_experts_per_tok=1, max_position_embeddings=64, attn_logit_softcapping=None)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    options = {o for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
               for o in a.option_strings}
    base = ["generate", "--hf", str(tmp_path / "hf"), "--gpu-expert-slots", "2", "--prompt-ids", "1,2",
            "--max-new-tokens", "2", "--device", "cpu"]
    assert main(base) == 2
    err = one_line(capsys)
    flags = set(re.findall(r"--[a-z][a-z-]+", err))
    assert "--ignore-config-field" in flags and flags <= options, (flags - options, err)
    d = json.loads((tmp_path / "hf" / "config.json").read_text())
    d["sliding_window"] = 32
    (tmp_path / "hf" / "config.json").write_text(json.dumps(d))
    assert main(base + ["--ignore-config-field", "attn_logit_softcapping"]) == 2
    err = one_line(capsys)
    flags = set(re.findall(r"--[a-z][a-z-]+", err))
    assert "--max-seq-len" in flags and flags <= options, err
    assert main(base + ["--ignore-config-field", "attn_logit_softcapping", "--max-seq-len", "32"]) == 0
