"""RankTrainer on plain gloo processes (no Ray): balance-loss invariance to the number of ranks,
offloaded experts == resident experts, and sharded checkpoints (reshard on load, crash before
the manifest). Every process computes the single-process reference itself from the same seeds.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cluster.ckpt import records_file, save_sharded
from cluster.engine import RankTrainer
from cluster.groups import build_groups, spawn_gloo
from cluster.shard import split_params, sync_gradients
from moe.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, tmp_dir_for
from moe.config import ModelConfig, MoEConfig, RunConfig, TrainConfig
from moe.data import load_corpus
from moe.train import Trainer, load_model, micro_batch_loss, routing_counts

GLOBAL_BATCH = 4


def tiny_run(batch_size: int, **train) -> RunConfig:
    """d_model 32, 2 MoE layers of 8 experts (top-2) + a shared expert, seq 16: seconds on CPU."""
    moe = MoEConfig(num_experts=8, top_k=2, d_expert=16, num_shared_experts=1, d_shared_expert=16,
                    balance_coef=0.1, z_loss_coef=1e-3, global_sync=train.pop("global_sync", "exact"))
    kw = dict(max_steps=3, batch_size=batch_size, seq_len=16, grad_accum=2, lr=1e-2, warmup_steps=1,
              eval_interval=1000, eval_batches=1, log_interval=1, ckpt_interval=0, device="cpu")
    kw.update(train)
    return RunConfig(name="tiny-test", model=ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=16, moe=moe),
                     train=TrainConfig(**kw))


def write_text_corpus(path: Path) -> Path:
    """~100 KB of real text (the stdlib json and email packages) for fast, meaningful batches."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((root / "json").glob("*.py")) + sorted((root / "email").glob("*.py"))[:6]
    path.write_bytes(b"\n".join(f.read_bytes() for f in files))
    return path


def _close(name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 2e-6, rtol: float = 1e-4) -> None:
    err = (got.double() - want.double()).abs()
    assert torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol), \
        f"{name}: max err {err.max():.3g} mean err {err.mean():.3g}"


# ---------------------------------------------------------------- balance invariance
def _balance_worker(rank: int, world: int, data: str, out: str) -> None:
    corpus = load_corpus(data)
    for sync in ("exact", "cumulative"):
        ref = Trainer(tiny_run(GLOBAL_BATCH, global_sync=sync), corpus=corpus, out_dir=out, progress=False)
        micro = ref.batches(0)
        pre = routing_counts(ref.model, [x for x, _ in micro]) if ref.tracker.needs_prepass else None
        ref.tracker.begin_step(pre)
        lbl = []
        for x, y in micro:
            ml = micro_batch_loss(ref.model, x, y, ref.tracker, 0.5)
            ml.total.backward()
            lbl.append(ml.balance)
        ref_lbl = sum(lbl) / len(lbl)
        for w, ep in ((1, 1), (2, 2), (4, 4), (4, 2)):  # (4, 2): experts also summed over 2 replicas
            groups = build_groups(ep, 8, ranks=list(range(w)))
            if groups is None:
                continue
            rt = RankTrainer(tiny_run(GLOBAL_BATCH // w, global_sync=sync), groups, corpus=corpus, out_dir=out,
                             progress=False)
            parts = rt.forward_backward(rt.batches(0))
            sync_gradients(*split_params(rt.model, rt.expert_names), groups, rt.timer)
            m = rt._reduce_metrics(parts)
            tag = f"{sync} world {w} ep {ep}"
            assert abs(m["balance_loss"] - ref_lbl) < 1e-6, f"{tag}: LBL {m['balance_loss']} != {ref_lbl}"
            for i, (a, b) in enumerate(zip(rt.model.moe_layers(), ref.model.moe_layers())):
                _close(f"{tag} router {i} grad", a.router.weight_ED.grad, b.router.weight_ED.grad)
                _close(f"{tag} expert {i} grad", a.experts.w13_EDF2.grad, b.experts.w13_EDF2.grad[groups.layout.expert_rows])
            _close(f"{tag} embed grad", rt.model.embed.weight.grad, ref.model.embed.weight.grad)


def test_balance_loss_and_router_grads_invariant_to_rank_count(tmp_path):
    """The same global batch split over 1, 2 or 4 ranks (and 4 ranks as 2 replicas x EP=2): the same
    global-batch LBL, router, expert and dense gradients as one process, exact and cumulative sync."""
    spawn_gloo(_balance_worker, 4, str(write_text_corpus(tmp_path / "text.txt")), str(tmp_path / "out"))


# ---------------------------------------------------------------- offload
def _offload_worker(rank: int, world: int, data: str, out: str) -> None:
    corpus = load_corpus(data)
    groups = build_groups(2, 8)  # 4 ranks, EP=2: experts are also summed over 2 replicas
    runs = {}
    for offload in (False, True):
        rt = RankTrainer(tiny_run(1), groups, corpus=corpus, out_dir=out, progress=False, offload=offload)
        runs[offload] = (rt, [rt.train_step()["loss"] for _ in range(3)])
    (a, la), (b, lb) = runs[False], runs[True]
    assert la == lb, f"losses differ: resident {la} vs offloaded {lb}"
    for (n, p), (n2, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert n == n2 and torch.equal(p, q), f"{n} differs after 3 steps (max {(p - q).abs().max():.3g})"
    assert all(p.device.type == "cpu" for n, p in b.model.named_parameters() if n in b.expert_names)
    stats, mem = b.streamer.stats, b.streamer.memory_report()
    assert stats["prefetch_hits"] > 0 and stats["fetches"] > 0, stats
    assert 0 < mem["expert_bytes_streamed_peak"] <= 2 * max(x.shard_bytes for x in b.streamer.banks), mem


def test_offloaded_experts_match_resident(tmp_path):
    spawn_gloo(_offload_worker, 4, str(write_text_corpus(tmp_path / "text.txt")), str(tmp_path / "out"))


# ---------------------------------------------------------------- checkpoints
def _val_logits(rt: RankTrainer) -> torch.Tensor:
    c, lay = rt.cfg, rt.lay
    x, _ = rt.corpus.batch("val", 0, c.batch_size, c.seq_len, seed=c.seed, rank=lay.rank, world=lay.world)
    rt.model.eval()
    with torch.no_grad():
        return rt.model(x).logits


class _Boom(RuntimeError):
    pass


def _boom() -> None:
    raise _Boom("simulated crash after the shards, before the manifest")


def _ckpt_worker(rank: int, world: int, data: str, out: str) -> None:
    corpus = load_corpus(data)
    root = Path(out) / "checkpoints"
    ep4 = RankTrainer(tiny_run(1), build_groups(4, 8), corpus=corpus, out_dir=out, progress=False)
    ep4.train_step(), ep4.train_step()
    path = ep4.save()
    logits = {4: _val_logits(ep4)}
    loss3 = {4: ep4.train_step()["loss"]}
    for w, ep in ((2, 2), (4, 2)):
        groups = build_groups(ep, 8, ranks=list(range(w)))
        if groups is None:
            continue
        rt = RankTrainer(tiny_run(GLOBAL_BATCH // w), groups, corpus=corpus, out_dir=out, progress=False)
        rt.load(Checkpoint(path))
        logits[(w, ep)] = _val_logits(rt)
        loss3[(w, ep)] = rt.train_step()["loss"]
    # EP=1: the single-process loader and Trainer read the same checkpoint
    model, _, _ = load_model(path)
    single = Trainer(tiny_run(GLOBAL_BATCH), corpus=corpus, out_dir=out, progress=False)
    single.load(Checkpoint(path))
    x, _ = corpus.batch("val", 0, GLOBAL_BATCH, 16, seed=0)
    with torch.no_grad():
        full = model(x).logits
    for key, got in logits.items():
        B = got.shape[0]  # every layout's job ranks are global ranks 0 .. w-1, so rows [rank*B, (rank+1)*B)
        _close(f"logits {key} vs EP=1", got, full[rank * B:(rank + 1) * B], atol=1e-5)
    loss3["single"] = single.train_step()["loss"]
    for key, v in loss3.items():
        assert abs(v - loss3[4]) < 1e-5, f"step-3 loss after loading at {key}: {v} vs EP=4 {loss3[4]}"
    # a crash after every shard is written and before the manifest: step 2 stays the newest valid one
    with pytest.raises(_Boom):
        save_sharded(root, 3, ep4.model, ep4.opt, ep4.expert_names, ep4.groups, ep4.run.to_dict(),
                     {"step": 3}, keep=5, before_manifest=_boom)
    dist.barrier()
    if rank == 0:
        tmp = tmp_dir_for(root, 3)
        assert sorted(p.name for p in tmp.glob("model-rank*")) == [f"model-rank{r:05d}.safetensors" for r in range(4)]
        assert (tmp / records_file(3)).exists()
        with pytest.raises(CheckpointError, match="was not completely written"):
            Checkpoint(tmp)
        assert latest_checkpoint(root) == path
    dist.barrier()
    final = ep4.save()  # the next save of the same step replaces the leftovers
    if rank == 0:
        assert latest_checkpoint(root) == final and final.name == "step_00000003"
        assert not tmp_dir_for(root, 3).exists() and not list(final.glob("records-*"))
        assert Checkpoint(final).manifest.layout == {"world": 4, "ep": 4}


def test_checkpoint_reshards_and_survives_crash_before_manifest(tmp_path):
    """Save at EP=4; load at EP=2 (2 and 4 ranks) and EP=1: same outputs and the same next step.
    Then a crash between the shards and the manifest leaves the previous checkpoint the latest."""
    spawn_gloo(_ckpt_worker, 4, str(write_text_corpus(tmp_path / "text.txt")), str(tmp_path / "out"))
