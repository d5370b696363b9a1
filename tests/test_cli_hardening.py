"""Issue #22, files, settings and the command line: a train_state without counters, configs too big
for the machine, a trace header that disagrees with its records, argparse typos, Ctrl-C on the
progress bar, the resume line, and downloads from a URI that are cleaned up."""
from __future__ import annotations

import copy
import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from moe_runtime.core.checkpoint import MANIFEST, Checkpoint, CheckpointError, latest_checkpoint, resume_check
from moe_runtime.core.cli import main
from moe_runtime.core.config import ConfigError, get_preset
from moe_runtime.core.data import Corpus
from moe_runtime.core.serial import seal, unseal
from moe_runtime.core.train import Trainer
from moe_runtime.offload.trace import TRACE_FORMAT, TRACE_VERSION, RoutingTrace, TraceError
from tests.fuzzing import make_seeds, manifest_body, reseal_manifest
from tests.helpers import interrupt_training_at, single_thread  # noqa: F401  (single_thread: autouse, one torch thread)

TINY = ["--config", "examples/configs/tiny.toml", "--batch-size", "2", "--seq-len", "16", "--device", "cpu",
        "--threads", "1"]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return make_seeds(tmp_path_factory.mktemp("hardening") / "seeds")


@pytest.fixture
def run_dir(seeds, tmp_path):
    """A copy of the seed run: run/checkpoints/step_00000003 and step_00000006."""
    shutil.copytree(seeds.ckpt_root.parent, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- 8. train_state without its counters
@pytest.mark.parametrize("state", [{}, {"step": 6}, {"step": 6, "tokens_seen": "many"}, {"tokens_seen": 96}])
def test_a_train_state_without_counters_is_skipped_by_resume(run_dir, seeds, state, capsys):
    newest = run_dir / "checkpoints" / "step_00000006"
    body = manifest_body(newest)
    body["train_state"] = state
    reseal_manifest(newest, body)  # sealed and otherwise valid
    Checkpoint(newest).verify()
    field = "tokens_seen" if "step" in state else "step"
    check = resume_check(seeds.run.to_dict(), seeds.params)
    with pytest.raises(CheckpointError, match=rf"{newest / MANIFEST}: train_state\.{field} is"):
        check(Checkpoint(newest))
    assert latest_checkpoint(run_dir / "checkpoints", check=check).name == "step_00000003"
    assert "skipping" in capsys.readouterr().out


def test_resume_uses_the_previous_checkpoint_when_the_newest_lacks_step(run_dir, seeds, capsys):
    newest = run_dir / "checkpoints" / "step_00000006"
    body = manifest_body(newest)
    body["train_state"] = {}
    reseal_manifest(newest, body)
    run = copy.deepcopy(seeds.run)
    run.train.max_steps = 7
    g = torch.Generator().manual_seed(0)
    corpus = Corpus(torch.randint(0, 256, (4000,), generator=g), torch.randint(0, 256, (500,), generator=g),
                    "random bytes", 256)
    trainer = Trainer(run, out_dir=run_dir, corpus=corpus, progress=False, plots=False)
    # A plan that restores the counters without resume_check (a cluster rank) gets a CheckpointError too.
    with pytest.raises(CheckpointError, match=r"train_state\.step is missing"):
        trainer.restore_counters(Checkpoint(newest))
    summary = trainer.fit()  # the old code: KeyError: 'step'
    assert summary["history"][0] == {"event": "resumed", "step": 3, "checkpoint": str(run_dir / "checkpoints" /
                                                                                     "step_00000003")}
    assert summary["step"] == 7
    out = capsys.readouterr().out
    assert "train_state.step is missing" in out and str(newest / MANIFEST) in out


def test_cluster_stores_skip_a_checkpoint_without_counters(run_dir, capsys):
    """A cluster resume (DirStore, RayStore on a path or a URI) finds the previous checkpoint too."""
    from moe_runtime.cluster.ckpt import DirStore, RayStore
    root = run_dir / "checkpoints"
    newest = root / "step_00000006"
    body = manifest_body(newest)
    body["train_state"] = {"tokens_seen": 96}
    reseal_manifest(newest, body)
    assert DirStore(root).newest() == str(root / "step_00000003")
    assert RayStore(str(root)).newest(lambda state: True) == str(root / "step_00000003")
    assert RayStore(root.as_uri()).newest().endswith("/step_00000003")
    assert "train_state.step is missing" in capsys.readouterr().out


# ---------------------------------------------------------------- 9. configs that cannot fit
def _config(tmp_path: Path, section: str, key: str, value: int) -> Path:
    d = {"model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "max_seq_len": 64,
                   "moe": {"num_experts": 4, "top_k": 2, "d_expert": 64}},
         "train": {"max_steps": 2, "batch_size": 2, "seq_len": 16, "device": "cpu"}}
    where = d["model"]["moe"] if section == "model.moe" else d[section]
    where[key] = value
    p = tmp_path / f"{key}.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("section, key, value, lower", [
    ("model", "d_model", 2**40, "model.d_model"),            # old: RuntimeError: Storage size calculation overflowed
    ("model.moe", "d_expert", 2**70, "model.moe.d_expert"),  # old: "...M parameters", then a TypeError traceback
])
def test_moe_train_refuses_a_model_that_cannot_exist_in_one_line(tmp_path, capsys, section, key, value, lower):
    assert main(["train", "--config", str(_config(tmp_path, section, key, value)), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert re.search(rf"training this model needs at least .* on cpu .*, but the available memory .* is .*; "
                     rf"lower {re.escape(lower)}", captured.err), captured.err
    assert "parameters" not in captured.out  # refused before the size is printed
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("section, key, value, lower", [
    ("model", "max_seq_len", 10**10, "model.max_seq_len"),   # old: a 640 GB rotary-table allocation
    ("train", "batch_size", 10**6, "train.batch_size (--batch-size)"),
    ("model", "vocab_size", 2**34, "model.vocab_size"),
])
def test_check_fits_names_what_is_needed_what_there_is_and_the_key(tmp_path, section, key, value, lower):
    from moe_runtime.core.config import load_config
    from moe_runtime.core.footprint import check_fits
    run = load_config(_config(tmp_path, section, key, value))
    with pytest.raises(ConfigError, match=rf"needs at least .* but the test budget is 16 GiB; "
                                          rf"lower {re.escape(lower)}"):
        check_fits(run, torch.device("cpu"), available=(16 * 2**30, "test budget"))


def test_the_estimate_is_a_lower_bound_that_passes_real_configs():
    from moe_runtime.core.footprint import check_fits, estimate
    tiny = get_preset("tiny")
    # tiny trains in ~350 MB of RSS growth (measured); the estimate stays below that
    assert 50 * 2**20 < estimate(tiny)["total"] < 350 * 2**20
    check_fits(tiny, torch.device("cpu"), available=(2**30, "1 GiB"))
    ep4 = estimate(get_preset("qwen3-30b-a3b"), expert_share=0.25)["weights"]
    assert ep4 < estimate(get_preset("qwen3-30b-a3b"))["weights"] / 2  # an EP rank holds a quarter of the experts
    with pytest.raises(ConfigError, match="mixtral-8x7b: training this model needs at least"):
        check_fits(get_preset("mixtral-8x7b"), torch.device("cpu"), available=(64 * 2**30, "64 GiB"))


def test_huge_presets_still_serve_shapes_and_projections(capsys):
    assert main(["presets"]) == 0
    assert "mixtral-8x7b" in capsys.readouterr().out


def test_load_model_refuses_a_checkpoint_config_too_big_for_the_machine(run_dir, monkeypatch):
    from moe_runtime.core import footprint
    from moe_runtime.core.modelio import load_model
    monkeypatch.setattr(footprint, "available_bytes", lambda device: (1024, "test budget"))
    with pytest.raises(ConfigError, match=r"loading this model needs at least .* the test budget is 1 KiB"):
        load_model(run_dir)


# ---------------------------------------------------------------- 10. trace header vs records
def test_a_trace_declaring_more_layers_than_its_records_hold_is_refused(seeds, tmp_path, capsys):
    body = unseal(seeds.trace.read_bytes(), TRACE_FORMAT, TRACE_VERSION, "seed", 1 << 30)
    body["num_layers"] += 1  # sealed and otherwise valid: the simulator would count slots for a phantom layer
    p = tmp_path / "more-layers.msgpack"
    p.write_bytes(seal(body, TRACE_FORMAT, TRACE_VERSION))
    with pytest.raises(TraceError, match=rf"trace file {p}: the header declares num_layers=3, but the records hold "
                                         rf"2 MoE layer\(s\) \(no record for layer \[2\]\)"):
        RoutingTrace.load(p)
    assert main(["trace", "simulate", str(p), "--copy-ms", "1", "--attn-ms", "1", "--expert-ms", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_layers=3" in err
    assert len(RoutingTrace.load(seeds.trace)) > 0  # the seed itself still loads


# ---------------------------------------------------------------- 16. typos and unknown flags
@pytest.mark.parametrize("argv, prog, named, hint", [
    (["train", "--max-step", "5"], "moe train", "--max-step", "--max-steps"),   # was accepted as --max-steps
    (["train", "--steps", "5"], "moe train", "--steps", "--max-steps"),         # was reported by `moe`
    (["generate", "--slots", "8"], "moe generate", "--slots", "--gpu-expert-slots"),  # was never named
    (["eval", "runs/x", "--batch", "2"], "moe eval", "--batch", "--batches"),
    (["trace", "simulate", "t.msgpack", "--capacity", "8"], "moe trace simulate", "--capacity", "--capacities"),
    (["train", "--no-resum"], "moe train", "--no-resum", "--no-resume"),
])
def test_a_typo_is_an_error_in_the_subcommands_usage_naming_the_flag(argv, prog, named, hint, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) <= 4, err
    assert lines[0].startswith(f"usage: {prog} ") and "usage: moe [-h] COMMAND" not in err, err
    assert lines[-1] == f"{prog}: error: unrecognized arguments: {named} (did you mean {hint}?)", err


def test_values_that_look_like_options_are_left_to_argparse(capsys):
    from moe_runtime.core.cli import build_parser
    args = build_parser().parse_args(["generate", "--checkpoint", "x", "--gpu-expert-slots", "2",
                                      "--prompt", "-- not a flag", "--prompt-ids", "1,2", "--temperature", "-1"])
    assert args.prompt == ["-- not a flag"] and args.temperature == -1.0


def test_every_argument_parser_refuses_abbreviations():
    root = Path(__file__).resolve().parents[1]
    for path in sorted([*root.glob("moe_runtime/**/*.py"), *root.glob("bench/*.py"), *root.glob("examples/*.py")]):
        text = path.read_text()
        for m in re.finditer(r"argparse\.ArgumentParser\(", text):
            assert "allow_abbrev=False" in text[m.end():m.end() + 200], f"{path}: an ArgumentParser that abbreviates"


# ---------------------------------------------------------------- 18. Ctrl-C on the progress bar; the resume line
def test_ctrl_c_line_starts_on_its_own_line_after_the_progress_bar(tmp_path, capsys, monkeypatch):
    interrupt_training_at(monkeypatch, 3)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(out), "--max-steps", "8", "--ckpt-interval", "2"]) == 130
    err = capsys.readouterr().err
    assert "train:" in err, "the progress bar was drawn on stderr"
    line = next(l for l in err.split("\n") if "moe train: interrupted" in l)
    assert line.startswith("moe train: interrupted at step 3"), repr(err[-300:])


def test_a_rerun_says_where_it_resumes_from(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--no-progress", "--out", str(out), "--max-steps", "2", "--eval-interval", "2"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert main(["train", *TINY, "--no-progress", "--out", str(out), "--max-steps", "3", "--eval-interval", "3"]) == 0
    text = capsys.readouterr().out
    assert f"[moe] resuming from {out / 'checkpoints' / 'step_00000002'} (step 2)" in text


# ---------------------------------------------------------------- 19. loads from a URI leave nothing behind
def test_loading_from_a_uri_leaves_no_download_in_the_temp_dir(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    from moe_runtime.core.modelio import load_model
    tmp = tmp_path / "systemp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    uri = f"file://{run_dir}/checkpoints"  # a run stored as Ray Train stores one: <run>/step_*
    model, run, ck = load_model(uri)
    assert ck.step == 6 and sum(p.numel() for p in model.parameters()) > 0
    trainer = Trainer.from_checkpoint(uri, progress=False, plots=False, out_dir=tmp_path / "eval")
    assert trainer.step == 6
    assert list(tmp.iterdir()) == [], f"left behind: {list(tmp.iterdir())}"
    local, _, _ = load_model(run_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))


def test_an_s3_compatible_endpoint_from_aws_endpoint_url(run_dir, tmp_path, monkeypatch):
    """The README's recipe for MinIO & co.: AWS_ENDPOINT_URL, no URI query; the download is removed."""
    pafs = pytest.importorskip("pyarrow.fs")
    server_mod = pytest.importorskip("moto.server")
    from moe_runtime.core.modelio import load_model
    srv = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_ENDPOINT_URL", f"http://{host}:{port}")):
            monkeypatch.setenv(k, v)
        fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        fs.create_dir("moe-ckpt")
        for f in sorted((run_dir / "checkpoints").rglob("*")):
            if f.is_file():
                with fs.open_output_stream(f"moe-ckpt/run/{f.relative_to(run_dir / 'checkpoints')}") as out:
                    out.write(f.read_bytes())
        tmp = tmp_path / "systemp"
        tmp.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        model, run, ck = load_model("s3://moe-ckpt/run")
        assert ck.step == 6 and list(tmp.iterdir()) == []
    finally:
        srv.stop()


def test_the_declared_cuda_device_is_checked_against_its_free_memory(monkeypatch):
    from moe_runtime.core.footprint import check_fits
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    with pytest.raises(ConfigError, match=r"small: training this model needs at least .* on cuda .* but the free "
                                          r"memory on cuda(:0)? is 1 GiB"):
        check_fits(get_preset("small"), torch.device("cuda"))
    check_fits(get_preset("tiny"), torch.device("cuda"))
