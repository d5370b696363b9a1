"""Cluster training through Ray Train on the session's local Ray (CPU workers, gloo, loopback).

- impossible layouts and unusable storage are refused before any worker starts;
- DP x EP (4 workers, 2 replicas x EP=2) equals one process: losses and final weights;
- SIGKILL of a worker at a random step: Ray Train restarts the group, it resumes from the newest
  checkpoint, written by an EARLIER invocation, and ends with the uninterrupted run's weights;
- checkpoints to an S3-compatible server on loopback (moto), resumed from there at another EP,
  loaded into one process from the URI and evaluated the same;
- a hang (SIGSTOP) during setup or mid-training is detected within --collective-timeout and the
  error names the hung rank; a full disk ends the run at once with one line naming the path.
"""
from __future__ import annotations

import json
import random
import re
import time

import pytest
import torch

from moe_runtime.cluster.layout import ClusterConfig, FaultPlan
from moe_runtime.core.checkpoint import Checkpoint, latest_checkpoint
from moe_runtime.core.train import Trainer
from tests.test_cluster_training import GLOBAL_BATCH, tiny_run, write_text_corpus

pytestmark = pytest.mark.ray


def _cluster(run, cfg, data):
    from moe_runtime.cluster.job import ClusterTrainer
    return ClusterTrainer(run, cfg, data=data, progress=False, plots=False)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train_losses(recs) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in recs if "loss" in r and "event" not in r]


def _single(tmp_path, data, **kw) -> Trainer:
    ref = Trainer(tiny_run(**kw), data=data, out_dir=tmp_path / "single", progress=False, plots=False)
    ref.fit()
    return ref


def _assert_weights(ck: Checkpoint, ref: Trainer) -> None:
    """The cluster run's final state (weights and AdamW moments, experts reassembled from shards) equals
    the one-process run's up to summation order. The two sum gradients in different orders (per-rank
    partial sums joined by the gloo all-reduce, rows in all-to-all order), and AdamW divides each
    gradient by its own running RMS: where a gradient nearly cancels (an embedding row of a byte pulled
    both ways) a 1-ulp difference in the sum moves that element's update by up to ~lr x its relative
    error (2.3e-5 with lr 1e-2 on an AVX-512 AMD EPYC, within 2e-5 on Intel). So: every element within
    lr / 100, and the mean error within 1e-6 (1e-4 lr). A lost optimizer state, a replayed or skipped
    batch, or a wrong step count moves most elements by ~lr and fails both."""
    lr = ref.run.train.lr
    for name, t in ref.state_tensors().items():
        c = ck.tensor(name)
        err = (c.double() - t.double()).abs()
        assert torch.allclose(c, t, atol=lr / 100, rtol=1e-4) and float(err.mean()) <= 1e-6, \
            f"{name}: max err {float(err.max()):.3g}, mean err {float(err.mean()):.3g} (lr {lr})"


def test_refused_before_any_worker_starts(ray_local, tmp_path):
    from ray.util import placement_group_table

    from moe_runtime.cluster.job import ClusterFatalError
    n_pg = len(placement_group_table())
    run = tiny_run()
    with pytest.raises(ValueError, match=r"num_experts=8 is not divisible by expert_parallel=3; .*--ep"):
        _cluster(run, ClusterConfig(workers=3, ep=3), None)
    with pytest.raises(ValueError, match=r"workers=6 is not divisible by expert_parallel=4; .*valid --ep values"):
        _cluster(run, ClusterConfig(workers=6, ep=4), None)
    with pytest.raises(ValueError, match=r"batch_size=4 is the global batch and is not divisible by workers=3"):
        _cluster(tiny_run(), ClusterConfig(workers=3, ep=1), None)
    with pytest.raises(ValueError, match=r"need 16 CPUs but the Ray cluster has 4; lower --workers"):
        _cluster(tiny_run(16), ClusterConfig(workers=8, ep=4, cpus_per_worker=2, storage=str(tmp_path)), None).fit()
    with pytest.raises(ValueError, match=r"need one GPU each but the Ray cluster has 0 GPU"):
        _cluster(run, ClusterConfig(workers=2, use_gpu=True, storage=str(tmp_path)), None).fit()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ClusterFatalError, match=rf"storage {blocker}/runs is not writable .*pass a writable --storage"):
        _cluster(run, ClusterConfig(workers=2, storage=str(blocker / "runs")), None).fit()
    with pytest.raises(ClusterFatalError, match=r"--data .*does not exist"):
        _cluster(run, ClusterConfig(workers=2), tmp_path / "missing.txt")
    assert len(placement_group_table()) == n_pg, "a placement group was created for a refused config"


def test_relative_storage_resolved_or_refused(monkeypatch, tmp_path):
    from moe_runtime.cluster.job import ClusterFatalError, resolve_storage
    monkeypatch.chdir(tmp_path)
    path, note = resolve_storage("runs")
    assert path == str(tmp_path / "runs") and f"resolved against {tmp_path}" in note
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what `ray job submit` sets for its entrypoint
    with pytest.raises(ClusterFatalError, match=r"--storage runs is a relative path.*--storage \"\$PWD/runs\""):
        resolve_storage("runs")
    assert resolve_storage("s3://b/runs")[0] == "s3://b/runs"


def test_dp_ep_through_ray_train_equals_single_process(ray_local, tmp_path):
    data = write_text_corpus(tmp_path / "text.txt")
    kw = dict(max_steps=3, ckpt_interval=3)
    s = _cluster(tiny_run(**kw), ClusterConfig(workers=4, ep=2, storage=str(tmp_path / "store")), data).fit()
    assert s["step"] == 3 and s["layout"]["replicas"] == 2
    ref = _single(tmp_path, data, **kw)
    got = _train_losses(_records(tmp_path / "store" / "tiny-test" / "metrics.jsonl"))
    want = _train_losses(ref.history)
    assert [st for st, _ in got] == [1, 2, 3] == [st for st, _ in want]
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) < 1e-5, f"step {step}: cluster loss {a} vs single process {b}"
    ck = Checkpoint(latest_checkpoint(tmp_path / "store" / "tiny-test"))
    assert ck.step == 3 and ck.manifest.layout == {"world": 4, "ep": 2}
    _assert_weights(ck, ref)
    tokens_routed = 2 * GLOBAL_BATCH * 16 * 2 * 2  # layers x (sequences x seq_len x micro-batches) x top_k
    last = s["history"][-2]
    assert sum(last["expert_load"]) == tokens_routed and sum(last["rank_load"]) == tokens_routed


@pytest.mark.slow
def test_sigkill_at_random_step_resumes_across_invocations(ray_local, tmp_path):
    """Invocation 1 dies (no retries left) after its step-2 checkpoint; invocation 2 resumes from
    it, loses a worker to SIGKILL at a random later step, is restarted by Ray Train from the newest
    checkpoint, and ends with the weights of one uninterrupted single process."""
    from moe_runtime.cluster.job import ClusterTrainingError
    data = write_text_corpus(tmp_path / "text.txt")
    kw = dict(max_steps=6, ckpt_interval=2, keep_checkpoints=2)
    store = str(tmp_path / "store")
    cfg = dict(workers=2, ep=2, storage=store, collective_timeout_s=30)
    with pytest.raises(ClusterTrainingError, match="max_failures=0"):
        _cluster(tiny_run(**kw), ClusterConfig(**cfg, max_failures=0, fault=FaultPlan(
            rank=0, step=3, point="step", marker=str(tmp_path / "kill1"))), data).fit()
    step = random.Random().randint(3, 5)
    s = _cluster(tiny_run(**kw), ClusterConfig(**cfg, max_failures=1, fault=FaultPlan(
        rank=1, step=step, point="step", marker=str(tmp_path / "kill2"))), data).fit()
    assert s["step"] == 6 and (tmp_path / "kill2").exists()
    recs = _records(tmp_path / "store" / "tiny-test" / "metrics.jsonl")
    resumed = [r["step"] for r in recs if r.get("event") == "resumed"]
    assert resumed == [2, step - step % 2], (resumed, step)  # first from invocation 1's checkpoint
    ref = _single(tmp_path, data, **kw)
    ck = Checkpoint(latest_checkpoint(tmp_path / "store" / "tiny-test"))
    assert ck.step == 6
    _assert_weights(ck, ref)
    steps = sorted(p.name for p in (tmp_path / "store" / "tiny-test").glob("step_*"))
    assert steps[-2:] == ["step_00000004", "step_00000006"] and len(steps) <= 3, steps  # num_to_keep=2 per run


@pytest.mark.slow
def test_no_resume_retry_ignores_an_older_invocations_checkpoints(ray_local, tmp_path):
    """Invocation 1 leaves step_2 and step_4; invocation 2 (--no-resume) writes its own step_2 and
    loses a worker at step 3: the retry resumes from ITS step 2, not invocation 1's newer step 4."""
    from moe_runtime.cluster.job import ClusterTrainingError
    data = write_text_corpus(tmp_path / "text.txt")
    kw = dict(max_steps=6, ckpt_interval=2, keep_checkpoints=5)
    cfg = dict(workers=2, ep=2, storage=str(tmp_path / "store"), collective_timeout_s=30)
    with pytest.raises(ClusterTrainingError, match="max_failures=0"):
        _cluster(tiny_run(**kw), ClusterConfig(**cfg, max_failures=0, fault=FaultPlan(
            rank=0, step=5, point="step", marker=str(tmp_path / "kill1"))), data).fit()
    s = _cluster(tiny_run(**kw), ClusterConfig(**cfg, max_failures=1, fault=FaultPlan(
        rank=1, step=3, point="step", marker=str(tmp_path / "kill2"))), data).fit(resume=False)
    assert s["step"] == 6 and (tmp_path / "kill2").exists()
    recs = _records(tmp_path / "store" / "tiny-test" / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("event") == "resumed"] == [2]
    _assert_weights(Checkpoint(latest_checkpoint(tmp_path / "store" / "tiny-test")), _single(tmp_path, data, **kw))


@pytest.mark.slow
def test_s3_checkpoints_resume_at_other_ep_and_load_in_one_process(ray_local, s3_server, tmp_path):
    from moe_runtime.core.modelio import load_model
    endpoint, bucket = s3_server
    storage = f"s3://{bucket}/runs?endpoint_override={endpoint}&scheme=http"
    data = write_text_corpus(tmp_path / "text.txt")
    run_uri = f"s3://{bucket}/runs/tiny-test?endpoint_override={endpoint}&scheme=http"
    _cluster(tiny_run(max_steps=2, ckpt_interval=2), ClusterConfig(workers=2, ep=2, storage=storage), data).fit()
    s = _cluster(tiny_run(max_steps=4, ckpt_interval=2), ClusterConfig(workers=4, ep=4, storage=storage),
                 data).fit()  # EP=2 checkpoint resumed at EP=4, from S3
    assert s["step"] == 4 and s["history"][0] == {"event": "resumed", "step": 2,
                                                  "checkpoint": run_uri.replace("?", "/step_00000002?")}
    model, run, ck = load_model(run_uri)
    assert ck.step == 4 and ck.manifest.layout == {"world": 4, "ep": 4}
    single = Trainer.from_checkpoint(run_uri, data=data, out_dir=tmp_path / "eval", progress=False, plots=False)
    assert abs(single.evaluate()["val_loss"] - s["last_eval"]["val_loss"]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("point,step", [("setup", 0), ("step", 2)])
def test_hang_detected_within_bound_naming_the_rank(ray_local, tmp_path, point, step):
    from moe_runtime.cluster.job import ClusterTrainingError
    data = write_text_corpus(tmp_path / "text.txt")
    cfg = ClusterConfig(workers=2, ep=2, storage=str(tmp_path / "store"), max_failures=0, collective_timeout_s=5,
                        fault=FaultPlan(rank=1, step=step, point=point, action="hang", marker=str(tmp_path / "m")))
    t0 = time.monotonic()
    with pytest.raises(ClusterTrainingError, match=rf"rank 1 stopped responding \(last seen in {point} at step "
                                                   rf"{step}, .*ranks \[0\] timed out waiting for it after 5s") as e:
        _cluster(tiny_run(max_steps=4), cfg, data).fit()
    silent_s = float(re.search(r"at step \d+, ([0-9.]+)s ago", str(e.value)).group(1))
    assert silent_s < 5 + 2 + 5, f"named {silent_s:.1f}s after the rank went silent; the bound is the 5s timeout"
    assert time.monotonic() - t0 < 120


def test_disk_full_ends_the_run_at_once_naming_the_path(ray_local, tmp_path):
    from moe_runtime.cluster.job import ClusterFatalError
    data = write_text_corpus(tmp_path / "text.txt")
    cfg = ClusterConfig(workers=2, ep=2, storage=str(tmp_path / "store"), max_failures=3,
                        fault=FaultPlan(rank=1, step=2, point="checkpoint_write", action="disk_full",
                                        marker=str(tmp_path / "m")))
    with pytest.raises(ClusterFatalError, match=r"^rank 1 cannot write /\S+/model-rank00001.safetensors: "
                                                r"\[Errno 28\] No space left on device") as e:
        _cluster(tiny_run(max_steps=4, ckpt_interval=2), cfg, data).fit()
    assert "\n" not in str(e.value)
    recs = _records(tmp_path / "store" / "tiny-test" / "metrics.jsonl")
    assert not [r for r in recs if r.get("event") == "resumed"], "a disk error must not be retried"
