"""RankTrainer: one rank of a data x expert parallel training job (torch.distributed, no Ray).

Legend: W ranks, B sequences per rank per micro-batch, S sequence length, L MoE layers, E experts.

Per optimizer step, on every rank (collectives in brackets):
1. exact global-batch balance: a no-grad routing pre-pass over the step's micro-batches
   [all-to-all per layer], then BalanceTracker.begin_step [ONE all-reduce of the [L, E] counts];
2. per micro-batch: forward [all-to-all x 2 per MoE layer], loss = CE + coef * LBL(global f, local p)
   + z-loss, backward [reverse all-to-all x 2 per MoE layer];
3. gradient sync [bucketed all-reduce: dense over the job, experts over the replica group];
4. global-norm clipping [one scalar all-reduce over the EP group]; AdamW step;
5. metrics [one small all-reduce]: mean CE / LBL / z over ranks, rows each rank's experts received.
Rank r trains on rows [r*B, (r+1)*B) of the global batch (moe.data.Corpus.batch(rank, world)), so
the job equals one process on the concatenated batch (batch_size = B * W), up to fp32 rounding.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cluster.ckpt import load_sharded, save_sharded
from cluster.dispatch import AllToAllDispatcher, CommTimer, count_reducer
from cluster.groups import ParallelGroups
from cluster.layout import FaultPlan
from cluster.offload import enable_expert_offload
from cluster.shard import clip_grad_norm, expert_param_names, shard_experts, split_params, sync_gradients
from moe.checkpoint import Checkpoint, CheckpointError, list_checkpoints, step_dir_name
from moe.config import RunConfig
from moe.data import Corpus
from moe.model import MoETransformer
from moe.router import BalanceTracker
from moe.stats import balance_metrics
from moe.train import (autocast_ctx, build_optimizer, eval_report, lr_at, micro_batch_loss, resolve_device,
                       routing_counts, validation_pass)


class RankTrainer:
    """See module docstring. Every rank of the job constructs one and calls the same methods."""

    def __init__(self, run: RunConfig, groups: ParallelGroups, *, corpus: Corpus, out_dir: str | Path,
                 offload: bool = False, progress: bool = True, plots: bool = False, timer_sync: bool = False,
                 fault: FaultPlan | None = None, attempt: int = 0):
        self.run, self.cfg, self.groups, self.lay = run, run.train, groups, groups.layout
        self.corpus, self.out_dir = corpus, Path(out_dir)
        self.is_root, self.progress, self.plots = self.lay.rank == 0, progress, plots
        self.fault, self.attempt = fault, attempt
        self.device = resolve_device(self.cfg.device)
        self.timer = CommTimer(sync_cuda=timer_sync)
        torch.manual_seed(self.cfg.seed)
        model = MoETransformer(run.model)  # full seeded init on every rank, then keep my experts
        shard_experts(model, groups, self.timer)
        self.model = model.to(self.device)
        self.streamer = enable_expert_offload(self.model, self.device) if offload else None
        self.expert_names = expert_param_names(self.model)
        self.opt = build_optimizer(self.model, self.cfg)
        if self.streamer is not None and self.device.type == "cuda":
            for g in self.opt.param_groups:  # the multi-tensor path groups by device: CPU experts, GPU dense
                g["foreach"] = True
        self.tracker = BalanceTracker(run.model.moe, run.model.num_moe_layers,
                                      reduce=count_reducer(groups.world, self.timer))
        self.step, self.tokens_seen, self.run_id = 0, 0, None
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ one step
    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c, lay = self.cfg, self.lay
        return [tuple(t.to(self.device) for t in self.corpus.batch("train", step, c.batch_size, c.seq_len, seed=c.seed,
                                                                    micro=m, rank=lay.rank, world=lay.world))
                for m in range(c.grad_accum)]

    def dispatchers(self) -> list[AllToAllDispatcher]:
        return [layer.dispatcher for layer in self.model.moe_layers()]

    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        """Steps 1-2 of the module docstring; gradients are left unsynchronised in .grad."""
        c, model = self.cfg, self.model
        model.train()
        with autocast_ctx(self.device, c.autocast_bf16):
            pre = routing_counts(model, [x for x, _ in micro]) if self.tracker.needs_prepass else None
            self.tracker.begin_step(pre)
            for d in self.dispatchers():
                d.rows_received = 0
            parts = []
            for x, y in micro:
                ml = micro_batch_loss(model, x, y, self.tracker, 1.0 / c.grad_accum)
                ml.total.backward()
                parts.append(ml)
        return parts

    def train_step(self) -> dict[str, Any]:
        c, t0 = self.cfg, time.perf_counter()
        self.timer.reset()
        copied0 = self.streamer.stats["bytes_copied"] if self.streamer is not None else 0
        lr = lr_at(self.step, c)
        for g in self.opt.param_groups:
            g["lr"] = lr
        parts = self.forward_backward(self.batches(self.step))
        dense, experts = split_params(self.model, self.expert_names)
        sync_gradients(dense, experts, self.groups, self.timer)
        gnorm = clip_grad_norm(dense, experts, c.grad_clip if c.grad_clip > 0 else 1e30, self.groups, self.timer)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.streamer is not None:
            self.streamer.invalidate()
        counts_LE = self.tracker.end_step()
        for layer, counts_E in zip(self.model.moe_layers(), counts_LE if counts_LE is not None else []):
            layer.router.update_bias(counts_E)
        m = self._reduce_metrics(parts)
        self.step += 1
        self.tokens_seen += c.grad_accum * c.batch_size * c.seq_len * self.lay.world
        comm = self.timer.reset()
        t_step = time.perf_counter() - t0
        m.update(step=self.step, lr=lr, grad_norm=gnorm, drop_rate=0.0, counts=counts_LE, t_step=t_step,
                 t_alltoall=comm["alltoall"], t_allreduce=comm["allreduce"],
                 t_compute=max(0.0, t_step - comm["alltoall"] - comm["allreduce"]))
        if self.streamer is not None:
            m["h2d_bytes"] = self.streamer.stats["bytes_copied"] - copied0  # expert weights fetched this step
        return m

    def _reduce_metrics(self, parts: list) -> dict[str, Any]:
        W, n = self.lay.world, len(parts)
        vec = torch.zeros(3 + W, dtype=torch.float64, device=self.device)
        vec[0] = sum(p.ce for p in parts) / n
        vec[1] = sum(p.balance for p in parts) / n
        vec[2] = sum(p.z for p in parts) / n
        vec[3 + self.lay.rank] = sum(d.rows_received for d in self.dispatchers())
        if W > 1:
            dist.all_reduce(vec, group=self.groups.world)  # collective: metrics of every rank
        vals = vec.tolist()  # host sync: logged metrics
        return {"loss": vals[0] / W, "balance_loss": vals[1] / W, "z_loss": vals[2] / W,
                "rank_load": [int(v) for v in vals[3:]]}

    # ------------------------------------------------------------------ the loop
    def fit(self, *, resume: bool = True, until_step: int | None = None, run_id: str | None = None
            ) -> dict[str, Any]:
        """Train to max_steps (or until_step). resume: start from the newest valid checkpoint of any
        run; else only from one this job (`run_id`) wrote itself, e.g. before a worker failure."""
        c = self.cfg
        self.run_id = run_id
        if self.is_root:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(self.run.to_dict(), indent=2))
        if self.step == 0 and (resume or run_id is not None):
            self.resume_latest(None if resume else run_id)
        end = min(c.max_steps, until_step if until_step is not None else c.max_steps)
        t0, tok0, last_eval, m = time.perf_counter(), self.tokens_seen, None, {}
        while self.step < end:
            self._maybe_die("step")
            m = self.train_step()
            counts = m.pop("counts")
            m["tokens_per_s"] = (self.tokens_seen - tok0) / max(time.perf_counter() - t0, 1e-9)
            if self.step % c.log_interval == 0 or self.step == end:
                if counts is not None:
                    m.update({k: v for k, v in balance_metrics(counts).items() if not k.startswith("per_layer")})
                    m["expert_load"] = [int(v) for v in counts.sum(dim=0).tolist()]
                self._log(m, progress_line=f"step {self.step}/{end}")
            if self.step % c.eval_interval == 0 or self.step == c.max_steps:
                last_eval = self.evaluate()
                self._log(last_eval, progress_line=f"step {self.step}: eval")
            if (c.ckpt_interval and self.step % c.ckpt_interval == 0) or self.step == c.max_steps:
                self.save()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "final_loss": m.get("loss"),
                "last_eval": last_eval, "out_dir": str(self.out_dir), "history": self.history if self.is_root else [],
                "offload": self.streamer.memory_report() | self.streamer.stats if self.streamer else None}

    def _log(self, rec: dict[str, Any], progress_line: str) -> None:
        if not self.is_root:
            return
        rec = {k: v for k, v in rec.items() if not torch.is_tensor(v)}
        self.history.append(rec)
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.progress:
            keys = ("loss", "val_loss", "balance_loss", "tokens_per_s", "load_max_over_mean")
            body = " ".join(f"{k} {rec[k]:.4g}" for k in keys if isinstance(rec.get(k), float))
            extra = f" rank_load {rec['rank_load']}" if "rank_load" in rec else ""
            print(f"[cluster rank 0] {progress_line} {body}{extra}", flush=True)

    def _maybe_die(self, point: str) -> None:
        f = self.fault
        if f and self.attempt == 0 and f.point == point and f.rank == self.lay.rank and f.step == self.step:
            print(f"[cluster rank {self.lay.rank}] fault plan: exiting at step {self.step} ({point})", flush=True)
            sys.stdout.flush()
            os._exit(1)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> dict[str, Any]:
        """Validation loss over the global validation batches (each rank its rows) and expert load."""
        lay = self.lay
        loss, counts = validation_pass(self.model, self.corpus, self.cfg, self.device, batches,
                                       rank=lay.rank, world=lay.world)
        loss_t = torch.tensor([loss], dtype=torch.float64, device=self.device)
        if lay.world > 1:
            dist.all_reduce(loss_t, group=self.groups.world)  # collective: mean validation loss over ranks
        if counts is not None:
            counts = self.tracker.reduce(counts).cpu()  # collective: validation counts of every rank
        plots = self.out_dir / "plots" if self.plots and self.is_root else None
        return eval_report(self.step, float(loss_t) / lay.world, counts, plots, self.run.name)

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self) -> Path:
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "run_id": self.run_id,
                 "layout": {"world": self.lay.world, "ep": self.lay.ep, "batch_size_per_worker": self.cfg.batch_size}}
        # The manifest holds the single-process twin's config (global batch), so Trainer.from_checkpoint
        # and `moe eval` continue with the same batches; resuming on a cluster uses the job's own config.
        config = self.run.to_dict()
        config["train"]["batch_size"] = self.cfg.batch_size * self.lay.world
        return save_sharded(self.ckpt_root, self.step, self.model, self.opt, self.expert_names, self.groups,
                            config, state, self.cfg.keep_checkpoints,
                            before_manifest=lambda: self._maybe_die("before_manifest"))

    def load(self, ck: Checkpoint) -> None:
        load_sharded(ck, self.model, self.opt, self.expert_names, self.groups)
        if self.streamer is not None:
            self.streamer.invalidate()
        self.step = int(ck.manifest.train_state["step"])
        self.tokens_seen = int(ck.manifest.train_state.get("tokens_seen", 0))

    def resume_latest(self, run_id: str | None = None) -> int | None:
        """Load the newest valid checkpoint rank 0 sees (of run `run_id` only, if given); every
        rank loads the same step."""
        step_t = torch.tensor([-1], dtype=torch.int64, device=self.device)
        if self.is_root:
            last = newest_valid_checkpoint(self.ckpt_root, run_id)
            if last is not None:
                step_t[0] = Checkpoint(last).step
        if self.lay.world > 1:
            dist.broadcast(step_t, src=self.groups.root, group=self.groups.world)  # collective: the step to resume
        step = int(step_t)
        if step < 0:
            return None
        self.load(Checkpoint(self.ckpt_root / step_dir_name(step)))
        self._log({"event": "resumed", "step": self.step, "checkpoint": str(self.ckpt_root / step_dir_name(step))},
                  progress_line=f"resumed from step {step}")
        return step


def newest_valid_checkpoint(root: Path, run_id: str | None = None) -> Path | None:
    """moe.checkpoint.latest_checkpoint, optionally only among checkpoints written by run `run_id`."""
    for p in reversed(list_checkpoints(root)):
        try:
            ck = Checkpoint(p)
            if run_id is not None and ck.manifest.train_state.get("run_id") != run_id:
                continue
            for name in ck.names():
                ck.tensor(name)  # reads and checksums every shard
            return p
        except CheckpointError as e:
            print(f"[checkpoint] skipping {p}: {e}", flush=True)
    return None
