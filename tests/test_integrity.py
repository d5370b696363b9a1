"""Issue #12's reproductions, each a clear refusal now: checkpoints, traces, msgpack limits, resume.

Seeds: a real 6-step training run (checkpoints at steps 3 and 6) and a recorded trace, made by
tests/fuzzing.make_seeds. Every mutation works on a copy.
"""
from __future__ import annotations

import random
import shutil
import struct
import time

import msgpack
import pytest
import torch

from moe_runtime.core.checkpoint import (MANIFEST, Checkpoint, CheckpointError, latest_checkpoint, resume_check,
                            write_sealed)
from moe_runtime.core.config import ConfigError
from moe_runtime.core.manifest import FORMAT, VERSION
from moe_runtime.core.serial import DecodeError, seal, seal_packed, unpack_limited, unseal
from moe_runtime.core.train import Trainer, load_model
from moe_runtime.offload.trace import TRACE_FORMAT, TRACE_VERSION, RoutingTrace, TraceError
from tests.fuzzing import SHARD, make_seeds, manifest_body, reseal_manifest
from tests.helpers import single_thread  # noqa: F401,E402  (autouse: one torch thread)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return make_seeds(tmp_path_factory.mktemp("integrity") / "seeds")


@pytest.fixture
def run_dir(seeds, tmp_path):
    """A copy of the seed run: run/checkpoints/step_00000003 and step_00000006."""
    shutil.copytree(seeds.ckpt_root.parent, tmp_path / "run")
    return tmp_path / "run"


def newest(run_dir):
    return run_dir / "checkpoints" / "step_00000006"


# ---------------------------------------------------------------- the manifest
@pytest.mark.parametrize("key", ["norm_topk_prob", "top_k", "tie_embeddings", "rope_theta", "step", "lr",
                                 "max_steps", "batch_size"])
def test_a_flipped_bit_after_any_manifest_field_is_refused_and_resume_falls_back(run_dir, key, capsys):
    mf = newest(run_dir) / MANIFEST
    raw = bytearray(mf.read_bytes())
    at = raw.index(msgpack.packb(key)) + len(msgpack.packb(key))
    raw[at] ^= 0x01
    mf.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=f"{mf}.*(sha256 digest|not valid msgpack)"):
        Checkpoint(newest(run_dir))
    model, run, ck = load_model(run_dir)  # the run dir: newest valid checkpoint
    assert ck.step == 3 and "skipping" in capsys.readouterr().out
    assert run.model.moe.norm_topk_prob is True and run.model.moe.top_k == 2


def test_optimizer_state_that_misses_a_parameter_is_skipped_by_resume(run_dir, seeds, capsys):
    body = manifest_body(newest(run_dir))
    k = "optim/blocks.0.attn.wq.weight/exp_avg"
    body["tensors"]["oPtim" + k[5:]] = body["tensors"].pop(k)
    reseal_manifest(newest(run_dir), body)  # a valid digest: only the coverage check can catch it
    Checkpoint(newest(run_dir)).verify()
    check = resume_check(seeds.run.to_dict(), seeds.params)
    with pytest.raises(CheckpointError, match=r"optimizer state does not cover every parameter .*"
                                              r"optim/blocks.0.attn.wq.weight/exp_avg"):
        check(Checkpoint(newest(run_dir)))
    assert latest_checkpoint(run_dir / "checkpoints", check=check).name == "step_00000003"
    assert "skipping" in capsys.readouterr().out


@pytest.mark.parametrize("reseal", [False, True])
def test_safetensors_header_dtype_edit_is_refused(run_dir, reseal):
    """F32 -> I32 in the header keeps every byte length; the digest, and with the digest recomputed
    the header-vs-manifest dtype check, refuse it."""
    step = newest(run_dir)
    p = step / SHARD
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].replace(b'"F32"', b'"I32"', 1)
    p.write_bytes(raw[:8] + header + raw[8 + n:])
    if reseal:
        reseal_manifest(step, manifest_body(step))
    pattern = r"stores .* as I32 .*, the manifest says F32" if reseal else "fails its sha256 digest"
    with pytest.raises(CheckpointError, match=pattern):
        Checkpoint(step).verify()


@pytest.mark.parametrize("target", ["/etc/passwd", "../step_00000003/" + SHARD, "sub/../" + SHARD])
def test_shard_paths_outside_the_checkpoint_are_refused(run_dir, target):
    step = newest(run_dir)
    body = manifest_body(step)
    body["files"][target] = body["files"].pop(SHARD)
    for t in body["tensors"].values():
        t["shards"][0]["file"] = target
    write_sealed(step / MANIFEST, body, FORMAT, VERSION)
    with pytest.raises(CheckpointError, match=rf"{step / MANIFEST} files: shard file name .* is not a plain"):
        Checkpoint(step)


@pytest.mark.parametrize("edit, pattern", [
    (lambda b: b.update(tensors=list(b["tensors"].values())), r"field 'tensors' is list .*, expected dict"),
    (lambda b: b.update(files=list(b["files"])), r"field 'files' is list .*, expected dict"),
    (lambda b: b["config"]["model"].update(moe=[1]), r"\[model.moe\] is a list"),
    (lambda b: b["config"].update(model=[1]), r"\[model\] is a list"),
    (lambda b: b["config"]["model"]["moe"].update(top_k=True), r"\[model.moe\] top_k=True must be an int, not bool"),
])
def test_structurally_wrong_manifests_name_the_file(run_dir, edit, pattern):
    step = newest(run_dir)
    body = manifest_body(step)
    edit(body)
    reseal_manifest(step, body)
    with pytest.raises((CheckpointError, ConfigError), match=rf"{step}.*{pattern}"):
        ck = Checkpoint(step)
        load_model(step)
        del ck


@pytest.mark.parametrize("fmt, version, pattern", [
    (FORMAT, 1, r"version 1; this build reads version 2 \(written before files carried digests"),
    (FORMAT, 3, r"version 3; this build reads version 2"),
    (TRACE_FORMAT, VERSION, r"is not a moe-runtime-checkpoint file \(format 'moe-routing-trace'\)"),
])
def test_wrong_format_or_version_names_the_file(run_dir, fmt, version, pattern):
    step = newest(run_dir)
    (step / MANIFEST).write_bytes(seal(manifest_body(step), fmt, version))
    with pytest.raises(CheckpointError, match=rf"{step / MANIFEST} .*{pattern}"):
        Checkpoint(step)


# ---------------------------------------------------------------- msgpack limits
@pytest.mark.parametrize("tail", [b"\x00", b"\x92\x01", b"\xc4\x10abc"])
def test_trailing_or_incomplete_trailing_data_is_refused(run_dir, seeds, tmp_path, tail):
    mf = newest(run_dir) / MANIFEST
    mf.write_bytes(mf.read_bytes() + tail)
    with pytest.raises(CheckpointError, match="trailing bytes"):
        Checkpoint(newest(run_dir))
    p = tmp_path / "t.msgpack"
    p.write_bytes(seeds.trace.read_bytes() + tail)
    with pytest.raises(TraceError, match="trailing bytes"):
        RoutingTrace.load(p)
    with pytest.raises(DecodeError, match="trailing bytes"):
        unpack_limited(msgpack.packb([1, 2]) + tail, 1 << 20)


def _peak_growth(fn) -> tuple[int, float]:
    from tests.fuzzing import _rss_reset, _status
    rss0 = _rss_reset()
    t0 = time.perf_counter()
    fn()
    return _status("VmHWM") - rss0, time.perf_counter() - t0


BOMB = b"\xdd" + struct.pack(">I", 8 << 20) + b"\x90" * (8 << 20)  # 8 MiB of empty arrays: ~500 MB on main


@pytest.mark.parametrize("sealed", [False, True])
def test_msgpack_bombs_are_refused_fast_in_bounded_memory(run_dir, tmp_path, sealed):
    def sealed_bomb(fmt, version):  # a valid digest over the bomb: the body decoder must stop it
        return seal_packed(BOMB, fmt, version)
    mf = newest(run_dir) / MANIFEST
    mf.write_bytes(sealed_bomb(FORMAT, VERSION) if sealed else BOMB)
    tp = tmp_path / "bomb.msgpack"
    tp.write_bytes(sealed_bomb(TRACE_FORMAT, TRACE_VERSION) if sealed else BOMB)
    for load, err in ((lambda: Checkpoint(newest(run_dir)), CheckpointError), (lambda: RoutingTrace.load(tp), TraceError)):
        def refused():
            with pytest.raises(err, match="msgpack objects for its|is not a"):
                load()
        growth, seconds = _peak_growth(refused)
        assert seconds < 3 and growth < 4 * len(BOMB) + 32 * 2**20, (growth, seconds)


def test_deep_nesting_and_ext_types_are_refused():
    with pytest.raises(DecodeError, match="nests deeper than 32"):
        unpack_limited(b"\x91" * 100 + b"\x90", 1 << 20)
    with pytest.raises(DecodeError, match="ext type"):
        unpack_limited(msgpack.packb(msgpack.ExtType(1, b"x")), 1 << 20)
    assert unpack_limited(msgpack.packb({"a": [1, 2.5, None, True, "s", b"b"]}, use_bin_type=True), 1 << 20) == \
        {"a": [1, 2.5, None, True, "s", b"b"]}


# ---------------------------------------------------------------- routing traces
def test_random_bit_flips_in_a_trace_are_all_refused(seeds, tmp_path):
    raw = seeds.trace.read_bytes()
    rng = random.Random(0)
    p = tmp_path / "t.msgpack"
    for _ in range(40):
        b = bytearray(raw)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        p.write_bytes(bytes(b))
        with pytest.raises(TraceError, match=str(p)):
            RoutingTrace.load(p)


@pytest.mark.parametrize("edit, pattern", [
    (lambda d: d.update(num_layers=2**40), r"num_layers=1099511627776.*out of range"),
    (lambda d: d.update(meta=[1]), r"field 'meta' is list, expected a map"),
    (lambda d: d["meta"].update(calibration="fast"), r"meta.calibration='fast' should be a dict"),
    (lambda d: d["meta"]["calibration"].update(tokens=[4, 4, 16]), r"meta.calibration: tokens must be a non-empty increasing list"),
    (lambda d: d["meta"].update(expert_bytes=None), r"meta.expert_bytes=None should be a non-negative int"),
    (lambda d: d.update(extra=1), r"unknown field\(s\) \['extra'\]"),
])
def test_hand_edited_traces_are_refused(seeds, tmp_path, edit, pattern):
    body = unseal(seeds.trace.read_bytes(), TRACE_FORMAT, TRACE_VERSION, "seed", 1 << 30)
    edit(body)
    p = tmp_path / "edited.msgpack"
    p.write_bytes(seal(body, TRACE_FORMAT, TRACE_VERSION))
    with pytest.raises(TraceError, match=rf"trace file {p}: {pattern}"):
        RoutingTrace.load(p)


def test_moe_trace_simulate_on_a_corrupted_trace_exits_2_with_one_line(seeds, tmp_path, capsys):
    from moe_runtime.core.cli import main
    b = bytearray(seeds.trace.read_bytes())
    b[len(b) // 2] ^= 0x10
    p = tmp_path / "t.msgpack"
    p.write_bytes(bytes(b))
    assert main(["trace", "simulate", str(p), "--copy-ms", "1", "--attn-ms", "1", "--expert-ms", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fails its sha256 digest" in err and str(p) in err


# ---------------------------------------------------------------- resume after a corrupted checkpoint
def _corrupt_manifest(step):
    b = bytearray((step / MANIFEST).read_bytes())
    b[len(b) // 3] ^= 0x04
    (step / MANIFEST).write_bytes(bytes(b))


def _corrupt_shard(step):
    b = bytearray((step / SHARD).read_bytes())
    b[-3] ^= 0x80
    (step / SHARD).write_bytes(bytes(b))


def _truncate_shard(step):
    (step / SHARD).write_bytes((step / SHARD).read_bytes()[:-100])


def _header_dtype(step):
    raw = (step / SHARD).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    (step / SHARD).write_bytes(raw[:8] + raw[8:8 + n].replace(b'"F32"', b'"I32"', 1) + raw[8 + n:])
    reseal_manifest(step, manifest_body(step))


def _optim_gap(step):
    body = manifest_body(step)
    del body["tensors"]["optim/head.weight/exp_avg_sq"]
    reseal_manifest(step, body)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(run config, trainer kwargs, final parameters of the run trained 0 -> 6 without a stop)."""
    from tests.fuzzing import Corpus
    from tests.helpers import small_run
    g = torch.Generator().manual_seed(1)
    corpus = Corpus(torch.randint(0, 256, (3000,), generator=g), torch.randint(0, 256, (400,), generator=g), "r", 256)
    run = small_run(max_steps=6, ckpt_interval=2, keep_checkpoints=3, eval_interval=6, grad_accum=1)
    kw = dict(corpus=corpus, progress=False, plots=False)
    a = Trainer(run, out_dir=tmp_path_factory.mktemp("uninterrupted"), **kw)
    a.fit()
    return run, kw, {n: p.detach().clone() for n, p in a.model.named_parameters()}


@pytest.mark.parametrize("corrupt", [_corrupt_manifest, _corrupt_shard, _truncate_shard, _header_dtype, _optim_gap,
                                     lambda step: (step / MANIFEST).unlink()])
def test_resume_after_a_corrupted_newest_checkpoint_ends_with_the_uninterrupted_weights(tmp_path, corrupt, capsys,
                                                                                        uninterrupted):
    run, kw, final = uninterrupted
    b = Trainer(run, out_dir=tmp_path / "b", **kw)
    b.fit(until_step=4)
    corrupt(b.ckpt_root / "step_00000004")
    b2 = Trainer(run, out_dir=tmp_path / "b", **kw)
    b2.fit()
    assert any(h.get("event") == "resumed" and h["step"] == 2 for h in b2.history), b2.history[:2]
    assert "skipping" in capsys.readouterr().out or corrupt.__name__ == "<lambda>"
    for n, p in b2.model.named_parameters():
        assert torch.equal(p, final[n]), n
