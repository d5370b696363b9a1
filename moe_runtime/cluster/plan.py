"""EPPlan: how one rank of a data x expert parallel job runs core.train.Trainer's loop.

Legend: W ranks, B = batch_size / W sequences per rank per micro-batch, L MoE layers, E experts.

Per optimizer step, on every rank (collectives in brackets), inside the shared loop:
1. exact global-batch balance: a no-grad routing pre-pass over the step's micro-batches
   [all-to-all per layer], then BalanceTracker.begin_step [ONE all-reduce of the [L, E] counts];
2. per micro-batch: forward [all-to-all x 2 per MoE layer], loss = CE + coef * LBL(global f, local p)
   + z-loss, backward [reverse all-to-all x 2 per MoE layer];
3. gradient sync [bucketed all-reduce: dense over the job, experts over the replica group];
4. global-norm clipping [one scalar all-reduce over the EP group]; AdamW step;
5. metrics [one small all-reduce]: mean CE / LBL / z over ranks, rows each rank's experts received.
Rank r trains on rows [r*B, (r+1)*B) of the global batch (core.data.Corpus.batch(rank, world)), so
the job equals one process on the same config, up to fp32 rounding; the config's batch_size is the
global batch everywhere, so a checkpoint evaluates the same wherever it is loaded.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from moe_runtime.cluster.ckpt import CheckpointStore, load_sharded, save_sharded
from moe_runtime.cluster.dispatch import AllToAllDispatcher, CommTimer, count_reducer
from moe_runtime.cluster.groups import ParallelGroups
from moe_runtime.cluster.layout import FaultPlan
from moe_runtime.cluster.offload import enable_expert_offload
from moe_runtime.cluster.shard import (DenseGradOverlap, clip_grad_norm, expert_param_names, split_params, sync_expert_gradients,
                           sync_gradients)
from moe_runtime.core.config import RunConfig, TrainConfig
from moe_runtime.core.data import Corpus
from moe_runtime.core.model import MoETransformer, init_model
from moe_runtime.core.router import CountReducer


class EPPlan:
    """moe_runtime.core.train.TrainPlan for one rank of the W x EP layout (see module docstring)."""

    def __init__(self, groups: ParallelGroups, store: CheckpointStore, *, offload: bool = False,
                 overlap_grad_sync: bool = True,
                 timer: CommTimer | None = None, fault: FaultPlan | None = None,
                 heartbeat: Callable[[str, int], None] | None = None,
                 metrics_sink: Callable[[dict[str, Any]], None] | None = None, invocation: str | None = None,
                 only_own_checkpoints: bool = False):
        self.groups, self.lay, self.store = groups, groups.layout, store
        self.rank, self.world, self.is_root = self.lay.rank, self.lay.world, self.lay.rank == 0
        self.offload, self.timer, self.fault = offload, timer or CommTimer(), fault
        self.heartbeat, self.metrics_sink = heartbeat, metrics_sink
        # --no-resume: a retry resumes only from checkpoints this invocation wrote (the manifest's train_state says)
        self.invocation, self.only_own_checkpoints = invocation, only_own_checkpoints
        self.streamer = None
        self.expert_names: set[str] = set()
        self.overlap_grad_sync, self.overlap = overlap_grad_sync, None

    # ------------------------------------------------------------------ model
    def build_model(self, run: RunConfig, device: torch.device) -> MoETransformer:
        """Only the dense part and this rank's E/EP experts are ever materialised (meta-device init)."""
        self.maybe_fault("setup", 0)
        lay = self.lay
        model = init_model(run.model, seed=run.train.seed, device=device, expert_rows=lay.expert_rows)
        for layer in model.moe_layers():
            layer.dispatcher = AllToAllDispatcher(lay.num_experts, self.groups.ep, self.timer)
        if self.offload:
            self.streamer = enable_expert_offload(model, device)
        self.expert_names = expert_param_names(model)
        return model

    def after_init(self, trainer) -> None:
        if self.overlap_grad_sync:
            dense = [p for n, p in trainer.model.named_parameters() if p.requires_grad and n not in self.expert_names]
            self.overlap = DenseGradOverlap(dense, self.groups.world, self.world, self.timer)
        if self.streamer is not None and trainer.device.type == "cuda":
            for g in trainer.opt.param_groups:  # the multi-tensor path groups by device: CPU experts, GPU dense
                g["foreach"] = True

    def count_reducer(self) -> CountReducer | None:
        return count_reducer(self.groups.world, self.timer)

    def batches(self, corpus: Corpus, cfg: TrainConfig, step: int, device: torch.device) -> list:
        B = cfg.batch_size // self.world
        return [tuple(t.to(device) for t in corpus.batch("train", step, B, cfg.seq_len, seed=cfg.seed, micro=m,
                                                          rank=self.rank, world=self.world))
                for m in range(cfg.grad_accum)]

    # ------------------------------------------------------------------ step
    def before_backward(self, trainer, last: bool) -> None:
        if last and self.overlap is not None:
            self.overlap.arm()  # dense buckets all-reduce while the rest of this backward runs

    def sync_and_clip(self, model: MoETransformer, max_norm: float) -> float:
        dense, experts = split_params(model, self.expert_names)
        if self.overlap is not None:
            self.overlap.finish()
            sync_expert_gradients(experts, self.groups, self.timer)
        else:
            sync_gradients(dense, experts, self.groups, self.timer)
        return clip_grad_norm(dense, experts, max_norm, self.groups, self.timer)

    def reduce_metrics(self, parts: list, model: MoETransformer) -> dict[str, Any]:
        W, n = self.world, len(parts)
        dev = parts[0].ce.device
        vec = torch.zeros(3 + W, dtype=torch.float64, device=dev)
        vec[0] = sum(p.ce for p in parts) / n
        vec[1] = sum(p.balance for p in parts) / n
        vec[2] = sum(p.z for p in parts) / n
        vec[3 + self.rank] = sum(layer.dispatcher.rows_received for layer in model.moe_layers())
        if W > 1:
            dist.all_reduce(vec, group=self.groups.world)  # collective: metrics of every rank
        vals = vec.tolist()  # host sync: logged metrics
        comm = self.timer.reset()
        m = {"loss": vals[0] / W, "balance_loss": vals[1] / W, "z_loss": vals[2] / W, "drop_rate": 0.0,
             "rank_load": [int(v) for v in vals[3:]], "t_alltoall": comm["alltoall"], "t_allreduce": comm["allreduce"]}
        if self.streamer is not None:
            m["h2d_bytes"] = self.streamer.stats["bytes_copied"]
        return m

    def reduce_eval(self, loss: float, counts_LE: torch.Tensor | None) -> tuple[float, torch.Tensor | None]:
        loss_t = torch.tensor([loss], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(loss_t, group=self.groups.world)  # collective: mean validation loss over ranks
        if counts_LE is not None:
            counts_LE = count_reducer(self.groups.world, self.timer)(counts_LE)  # collective: validation counts
        return float(loss_t) / self.world, counts_LE

    def after_optimizer_step(self, trainer) -> None:
        if self.streamer is not None:
            self.streamer.invalidate()  # the host shards changed: device copies are stale

    def before_step(self, trainer) -> None:
        if self.heartbeat is not None:
            self.heartbeat("step", trainer.step)
        self.maybe_fault("step", trainer.step)

    # ------------------------------------------------------------------ checkpoints and metrics
    def save(self, trainer) -> str:
        if self.heartbeat is not None:
            self.heartbeat("checkpoint", trainer.step)
        state = {"step": trainer.step, "tokens_seen": trainer.tokens_seen,
                 "layout": {"world": self.world, "ep": self.lay.ep},
                 **({"invocation": self.invocation} if self.invocation else {})}
        return save_sharded(self.store, trainer.step, trainer.model, trainer.opt, self.expert_names, self.groups,
                            trainer.run.to_dict(), state, metrics={"step": trainer.step},
                            before_manifest=lambda: self.maybe_fault("before_manifest", trainer.step),
                            before_write=lambda: self.maybe_fault("checkpoint_write", trainer.step))

    def resume(self, trainer) -> str | None:
        """Every rank loads the newest valid checkpoint rank 0 finds on the storage, whoever wrote it."""
        mine = (lambda st: st.get("invocation") == self.invocation) if self.only_own_checkpoints else None
        where = self.store.newest(mine) if self.is_root else None
        where = _broadcast_str(where, self.groups)  # collective: the checkpoint every rank loads
        if where is None:
            return None
        ck = self.store.open(where)
        load_sharded(ck, trainer.model, trainer.opt, self.expert_names, self.groups)
        if self.streamer is not None:
            self.streamer.invalidate()
        trainer.restore_counters(ck)
        return where

    def write_metrics(self, rec: dict[str, Any]) -> None:
        if self.metrics_sink is not None:
            self.metrics_sink(rec)
        if "event" not in rec or rec["event"] == "eval":
            keys = ("loss", "val_loss", "balance_loss", "tokens_per_s", "load_max_over_mean")
            body = " ".join(f"{k} {rec[k]:.4g}" for k in keys if isinstance(rec.get(k), float))
            extra = f" rank_load {rec['rank_load']}" if "rank_load" in rec else ""
            print(f"[cluster rank 0] step {rec.get('step')} {body}{extra}", flush=True)
        else:
            print(f"[cluster rank 0] {rec['event']}: {rec}", flush=True)

    # ------------------------------------------------------------------ chaos testing
    def maybe_fault(self, point: str, step: int) -> None:
        f = self.fault
        if not (f and f.point == point and f.rank == self.rank and f.step == step and _first_attempt(f)):
            return
        print(f"[cluster rank {self.rank}] fault plan: {f.action} at {point} step {step}", flush=True)
        sys.stdout.flush()
        if f.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif f.action == "hang":
            os.kill(os.getpid(), signal.SIGSTOP)
        elif f.action == "disk_full":
            raise OSError(28, "No space left on device (fault plan)", str(Path(f.marker).parent))


def _first_attempt(f: FaultPlan) -> bool:
    """A fault fires once per job: the first rank to reach it leaves a marker file."""
    try:
        fd = os.open(f.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _broadcast_str(s: str | None, groups: ParallelGroups) -> str | None:
    """Rank 0's string (or None) on every rank, as bytes in a tensor (no pickle)."""
    if groups.layout.world == 1:
        return s
    raw = b"" if s is None else s.encode()
    n = torch.tensor([len(raw) if s is not None else -1], dtype=torch.int64)
    dist.broadcast(n, src=groups.root, group=groups.world)  # collective: length (-1: none)
    if int(n) < 0:
        return None
    buf = torch.zeros(int(n), dtype=torch.uint8)
    if groups.layout.rank == 0 and raw:
        buf.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if int(n):
        dist.broadcast(buf, src=groups.root, group=groups.world)  # collective: the string
    return buf.numpy().tobytes().decode()
