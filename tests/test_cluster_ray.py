"""Ray worker groups on the session's local Ray instance (CPU actors, gloo).

- impossible layouts are refused before any placement group or actor exists;
- DP x EP training (4 workers: EP=4 for two steps, then resumed at 2 replicas x EP=2) equals one
  process on the concatenated batch, global-batch balance loss on;
- a worker that dies mid-run (os._exit): the group is torn down, recreated, resumes from the last
  checkpoint and ends with the same loss as an uninterrupted run (experts offloaded to host memory).
"""
from __future__ import annotations

import json

import pytest
import torch

from cluster.layout import ClusterConfig, FaultPlan
from moe.checkpoint import Checkpoint, latest_checkpoint
from moe.train import Trainer
from tests.test_cluster_training import GLOBAL_BATCH, tiny_run, write_text_corpus

pytestmark = pytest.mark.ray


def _cluster(run, cfg, out, data):
    from cluster.job import ClusterTrainer
    return ClusterTrainer(run, cfg, out_dir=out, data=data, progress=False, plots=False)


def _train_losses(path) -> list[tuple[int, float]]:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if "loss" in r and "event" not in r]


def test_impossible_layouts_refused_before_any_actor_starts(ray_local, tmp_path):
    from ray.util import placement_group_table
    n_pg = len(placement_group_table())
    run = tiny_run(1)
    with pytest.raises(ValueError, match=r"num_experts=8 is not divisible by expert_parallel=3; .*--ep"):
        _cluster(run, ClusterConfig(workers=3, ep=3), tmp_path, None)
    with pytest.raises(ValueError, match=r"workers=6 is not divisible by expert_parallel=4; .*valid --ep values"):
        _cluster(run, ClusterConfig(workers=6, ep=4), tmp_path, None)
    with pytest.raises(ValueError, match=r"need 8 CPUs but the Ray cluster has 4; lower --workers"):
        _cluster(run, ClusterConfig(workers=8, ep=4), tmp_path, None).fit()
    with pytest.raises(ValueError, match=r"need one GPU each but the Ray cluster has 0 GPU"):
        _cluster(run, ClusterConfig(workers=2, use_gpu=True), tmp_path, None).fit()
    bad = tiny_run(1)
    bad.model.moe.capacity_factor = 1.25
    with pytest.raises(ValueError, match="capacity_factor=1.25 is a single-process comparison mode"):
        _cluster(bad, ClusterConfig(workers=2), tmp_path, None)
    assert len(placement_group_table()) == n_pg, "a placement group was created for a refused config"
    assert not (tmp_path / "metrics.jsonl").exists()


def test_dp_ep_training_matches_single_process_and_resumes_at_other_ep(ray_local, tmp_path):
    data = write_text_corpus(tmp_path / "text.txt")
    out = tmp_path / "cluster"
    kw = dict(max_steps=4, ckpt_interval=2)
    s1 = _cluster(tiny_run(1, **kw), ClusterConfig(workers=4, ep=4), out, data).fit(until_step=2)
    assert s1["step"] == 2 and Checkpoint(latest_checkpoint(out / "checkpoints")).manifest.layout["ep"] == 4
    s2 = _cluster(tiny_run(1, **kw), ClusterConfig(workers=4, ep=2), out, data).fit()  # resumes step 2
    assert s2["step"] == 4 and s2["layout"]["replicas"] == 2
    ref = Trainer(tiny_run(GLOBAL_BATCH, **kw), data=data, out_dir=tmp_path / "single", progress=False, plots=False)
    ref.fit()
    got, want = _train_losses(out / "metrics.jsonl"), _train_losses(tmp_path / "single" / "metrics.jsonl")
    assert [s for s, _ in got] == [1, 2, 3, 4] and [s for s, _ in want] == [1, 2, 3, 4]
    for (step, a), (_, b) in zip(got, want):
        assert abs(a - b) < 1e-5, f"step {step}: cluster loss {a} vs single process {b}"
    ck = Checkpoint(latest_checkpoint(out / "checkpoints"))
    assert ck.step == 4 and ck.manifest.layout == {"world": 4, "ep": 2}
    for name, t in ref.state_tensors().items():  # weights and AdamW moments, experts reassembled from shards
        c = ck.tensor(name)
        err = (c.double() - t.double()).abs().max()
        assert torch.allclose(c, t, atol=2e-5, rtol=1e-4), f"{name}: max err {err:.3g}"
    last = s2["history"][-2] if "val_loss" in s2["history"][-1] else s2["history"][-1]
    tokens_routed = 2 * GLOBAL_BATCH * 16 * 2 * 2  # layers x (sequences x seq_len x micro-batches) x top_k
    assert sum(last["expert_load"]) == tokens_routed and len(last["expert_load"]) == 8
    assert sum(last["rank_load"]) == tokens_routed and len(last["rank_load"]) == 4


@pytest.mark.parametrize("point,step,replayed", [
    ("step", 3, [1, 2, 3, 3, 4, 5]),             # dies after step 3; checkpoint 2 -> steps 3.. again
    ("before_manifest", 4, [1, 2, 3, 4, 3, 4, 5]),  # dies saving step 4, shards written, no manifest
])
def test_worker_death_resumes_from_last_checkpoint(ray_local, tmp_path, point, step, replayed):
    data = write_text_corpus(tmp_path / "text.txt")
    out = tmp_path / "cluster"
    kw = dict(max_steps=5, ckpt_interval=2)
    cfg = ClusterConfig(workers=2, ep=2, offload_experts=True, collective_timeout_s=30, poll_s=0.2,
                        fault=FaultPlan(rank=1, step=step, point=point))  # worker 1 calls os._exit(1)
    summary = _cluster(tiny_run(GLOBAL_BATCH // 2, **kw), cfg, out, data).fit()
    assert summary["failures"] == 1 and summary["step"] == 5
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in recs if "event" in r]
    assert [e["event"] for e in events if e["event"] != "eval"] == ["worker_failure", "resumed"], events
    assert "worker 1 died" in events[0]["error"] and events[1]["step"] == 2  # step 4 was never committed
    losses = _train_losses(out / "metrics.jsonl")
    assert [s for s, _ in losses] == replayed
    cut = next(i for i, r in enumerate(recs) if r.get("event") == "worker_failure")
    first = {r["step"]: r["loss"] for r in recs[:cut] if "loss" in r and "event" not in r}
    again = {r["step"]: r["loss"] for r in recs[cut:] if "loss" in r and "event" not in r}
    assert set(first) & set(again) == {3, 4} & set(first), (first, again)
    for s in set(first) & set(again):
        assert again[s] == first[s], f"replayed step {s}: {again[s]} != first run's {first[s]} (must be exact)"
    ref = Trainer(tiny_run(GLOBAL_BATCH, **kw), data=data, out_dir=tmp_path / "single", progress=False, plots=False)
    ref.fit()
    want = _train_losses(tmp_path / "single" / "metrics.jsonl")[-1][1]
    assert abs(summary["final_loss"] - want) < 1e-5, f"final loss {summary['final_loss']} vs uninterrupted {want}"
    assert summary["offload"]["prefetch_hits"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]
