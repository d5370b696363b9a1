import json
import subprocess
import sys

import pytest

from moe_runtime.core.cli import main


def test_help_on_every_command(capsys):
    for cmd in ([], ["train"], ["eval"], ["generate"], ["trace"], ["presets"]):
        with pytest.raises(SystemExit) as e:
            main(cmd + ["--help"])
        assert e.value.code == 0
        assert "usage: moe" in capsys.readouterr().out


def test_train_then_eval(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "examples/configs/tiny.toml", "--out", str(out), "--max-steps", "3",
            "--batch-size", "2", "--seq-len", "16", "--eval-interval", "3", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "unigram baseline" in text and "val_loss" in text
    assert (out / "checkpoints" / "step_00000003" / "manifest.msgpack").is_file()
    assert main(["eval", str(out), "--json", str(tmp_path / "e.json"), "--device", "cpu"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["step"] == 3 and res["val_loss"] > 0 and "unigram_baseline" in res


def test_bad_arguments_give_clear_errors(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--max-steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "max_steps=0 must be > 0" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "no valid checkpoint under" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--preset", "nope"])


def test_python_dash_m_runs():
    r = subprocess.run([sys.executable, "-m", "moe_runtime", "presets"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "mixtral-8x7b" in r.stdout


def test_import_moe_without_optional_extras():
    code = ("import sys\n"
            "for m in ('ray', 'triton', 'transformers'): sys.modules[m] = None\n"
            "import torch, moe_runtime.core\n"
            "from moe_runtime import kernels\n"
            "print(kernels.backend_for(torch.device('cpu')))\n"
            "try:\n"
            "    import moe_runtime.cluster.job\n"
            "except ImportError as e:\n"
            "    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "reference" in r.stdout
    assert "pip install 'moe-runtime[ray]'" in r.stdout


def test_train_has_every_cluster_flag_and_refuses_out_with_workers(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--workers", "--ep", "--storage", "--max-failures", "--collective-timeout", "--cpus-per-worker",
                 "--offload-experts", "--ray-address", "--activation-checkpointing", "--overlap-grad-sync"):
        assert flag in text, flag
    assert main(["train", "--workers", "2", "--out", "runs/x"]) == 2
    assert "--out runs/x is for one-process runs; with --workers pass --storage" in capsys.readouterr().err
