"""Trainer: the Python training API, and the one training loop every layout runs.

    from moe_runtime import Trainer, get_preset
    trainer = Trainer(get_preset("tiny"), out_dir="runs/tiny")
    summary = trainer.fit()

One optimizer step = `grad_accum` micro-batches. Per micro-batch the loss is
    cross-entropy + balance_coef * LBL + z_loss_coef * z-loss      (divided by grad_accum)
with LBL's f_i formed as documented in core/router.py. Data batches depend only on (seed, step,
micro-batch), so resuming from a checkpoint continues exactly like an uninterrupted run.

The step and the fit loop below are the same for one process and for an expert-parallel rank;
what differs is a plan object: LocalPlan here, cluster.plan.EPPlan for a rank of a Ray Train job.
A plan builds this process's part of the model, picks its rows of each batch, synchronises and
clips gradients, reduces metrics, saves and resumes checkpoints, and says who logs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_runtime.core.checkpoint import (Checkpoint, latest_checkpoint, resume_check, save_checkpoint, set_aside,
                                         train_counters)
from moe_runtime.core.config import RunConfig, TrainConfig
from moe_runtime.core.data import Corpus, load_corpus
from moe_runtime.core.device import autocast_ctx, resolve_device
from moe_runtime.core.footprint import check_fits
from moe_runtime.core.model import MoETransformer, init_model
from moe_runtime.core.modelio import (is_uri, load_model, load_model_state, load_optimizer_tensors, opened_checkpoint,
                                     optimizer_tensors, resolve_checkpoint)  # noqa: F401 (re-export)
from moe_runtime.core.router import BalanceTracker, CountReducer
from moe_runtime.core.stats import balance_metrics, plot_expert_load


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to lr, then cosine down to lr * min_lr_ratio at max_steps. step is 0-based."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and expert stacks, not on norms or embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bias_stack = name.endswith(("experts.b13_EF2", "experts.b2_ED"))  # gpt-oss expert biases [E, ...]
        (no_decay if p.ndim < 2 or "embed" in name or bias_stack else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


@dataclass
class MicroLoss:
    """`total` carries the graph; the parts are detached 0-d tensors (no host sync per micro-batch)."""
    total: torch.Tensor
    ce: torch.Tensor
    balance: torch.Tensor
    z: torch.Tensor


def micro_batch_loss(model: MoETransformer, x_BS: torch.Tensor, y_BS: torch.Tensor, tracker: BalanceTracker,
                     scale: float = 1.0, out=None) -> MicroLoss:
    """Forward one micro-batch (unless `out` holds its forward already); `total` is ready for
    backward (already multiplied by scale)."""
    out = model(x_BS) if out is None else out
    ce = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y_BS.reshape(-1))
    lbl, z = tracker.losses(out.routing)
    m = model.cfg.moe
    total = ce + m.balance_coef * lbl.to(ce.device) + m.z_loss_coef * z.to(ce.device)
    return MicroLoss(total * scale, ce.detach(), lbl.detach().to(ce.device), z.detach().to(ce.device))


@torch.no_grad()
def routing_counts(model: MoETransformer, batches: list[torch.Tensor]) -> torch.Tensor:
    """[L, E] expert counts of these micro-batches under the current weights (no-grad pre-pass)."""
    counts = None
    for x in batches:
        c = torch.stack([r.counts_E for r in model(x).routing])
        counts = c if counts is None else counts + c
    return counts


def balance_tracker(run: RunConfig, world: int, reduce: CountReducer | None = None) -> BalanceTracker:
    """The step's BalanceTracker. With one micro-batch on one rank the exact global batch IS the
    micro-batch, so the routing pre-pass is skipped: micro-batch balancing gives the same counts
    (the same forward under the same weights), bit for bit, at no extra forward."""
    moe = run.model.moe
    if world == 1 and run.train.grad_accum == 1 and moe.balance_scope == "global_batch":
        moe = dataclasses.replace(moe, balance_scope="micro_batch")
    return BalanceTracker(moe, run.model.num_moe_layers, reduce=reduce)


@torch.no_grad()
def validation_pass(model: MoETransformer, corpus: Corpus, cfg: TrainConfig, device: torch.device,
                    batches: int | None = None, *, rank: int = 0, world: int = 1
                    ) -> tuple[float, torch.Tensor | None]:
    """Mean cross-entropy over the fixed validation batches (this rank's batch_size // world rows of
    each) and the [L, E] expert counts they routed (on device; None for a model without MoE layers)."""
    model.eval()
    n = batches or cfg.eval_batches
    total, counts = 0.0, None
    with autocast_ctx(device, cfg.autocast_bf16):
        for i in range(n):
            x, y = (t.to(device) for t in corpus.batch("val", i, cfg.batch_size // world, cfg.seq_len,
                                                       seed=cfg.seed, rank=rank, world=world))
            out = model(x)
            total += float(F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1)))
            if out.routing:
                cl = torch.stack([r.counts_E for r in out.routing])
                counts = cl if counts is None else counts + cl
    model.train()
    return total / n, counts


def eval_report(step: int, loss: float, counts_LE: torch.Tensor | None, plots_dir: Path | None,
                title: str) -> dict[str, Any]:
    """The eval record: loss, perplexity, balance metrics and (when plots_dir is given) the heatmap."""
    res: dict[str, Any] = {"event": "eval", "step": step, "val_loss": loss, "val_ppl": math.exp(loss)}
    if counts_LE is not None:
        res.update(balance_metrics(counts_LE))
        if plots_dir is not None:
            path = plot_expert_load(counts_LE, plots_dir / f"expert_load_step{step:06d}.png", f"{title} step {step}")
            (plots_dir / "expert_load_latest.png").write_bytes(path.read_bytes())
            res["heatmap"] = str(path)
    return res


class TrainPlan(Protocol):
    """What differs between one process and one rank of an expert-parallel job (see module docstring)."""

    rank: int
    world: int
    is_root: bool
    """Logs, writes metrics and plots."""

    def build_model(self, run: RunConfig, device: torch.device) -> MoETransformer: ...
    def count_reducer(self) -> CountReducer | None: ...
    def batches(self, corpus: Corpus, cfg: TrainConfig, step: int, device: torch.device) -> list: ...
    def sync_and_clip(self, model: MoETransformer, max_norm: float) -> float: ...
    def reduce_metrics(self, parts: list[MicroLoss], model: MoETransformer) -> dict[str, Any]: ...
    def reduce_eval(self, loss: float, counts_LE: torch.Tensor | None) -> tuple[float, torch.Tensor | None]: ...
    def save(self, trainer: "Trainer") -> str: ...
    def resume(self, trainer: "Trainer") -> str | None: ...
    def write_metrics(self, rec: dict[str, Any]) -> None: ...
    def after_init(self, trainer: "Trainer") -> None: ...
    def before_step(self, trainer: "Trainer") -> None: ...
    def after_optimizer_step(self, trainer: "Trainer") -> None: ...
    def before_backward(self, trainer: "Trainer", last: bool) -> None: ...


class LocalPlan:
    """One process holds the whole model; checkpoints go to out_dir/checkpoints."""

    rank, world, is_root = 0, 1, True

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir

    def build_model(self, run: RunConfig, device: torch.device) -> MoETransformer:
        return init_model(run.model, seed=run.train.seed, device=device)

    def count_reducer(self) -> CountReducer | None:
        return None

    def batches(self, corpus: Corpus, cfg: TrainConfig, step: int, device: torch.device) -> list:
        return [tuple(t.to(device) for t in corpus.batch("train", step, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                                          micro=m)) for m in range(cfg.grad_accum)]

    def sync_and_clip(self, model: MoETransformer, max_norm: float) -> float:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))  # host sync: logged metric

    def reduce_metrics(self, parts: list[MicroLoss], model: MoETransformer) -> dict[str, Any]:
        # host sync: one transfer of the step's loss parts, for logging
        ce, bal, z = torch.stack([torch.stack([p.ce, p.balance, p.z]) for p in parts]).mean(0).tolist()
        return {"loss": ce, "balance_loss": bal, "z_loss": z, "drop_rate": _mean_drop_rate(model)}

    def reduce_eval(self, loss: float, counts_LE: torch.Tensor | None) -> tuple[float, torch.Tensor | None]:
        return loss, counts_LE

    def save(self, trainer: "Trainer") -> str:
        state = {"step": trainer.step, "tokens_seen": trainer.tokens_seen}
        return str(save_checkpoint(trainer.ckpt_root, trainer.step, trainer.state_tensors(), trainer.run.to_dict(),
                                   state, keep=trainer.cfg.keep_checkpoints))

    def resume(self, trainer: "Trainer") -> str | None:
        # integrity: skips corrupted checkpoints (reason printed), refuses another run's (ResumeMismatch)
        params = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        last = latest_checkpoint(trainer.ckpt_root, check=resume_check(trainer.run.to_dict(), params))
        if last is None:
            return None
        trainer.load(Checkpoint(last))
        return str(last)

    def after_init(self, trainer: "Trainer") -> None:
        pass

    def before_step(self, trainer: "Trainer") -> None:
        pass

    def after_optimizer_step(self, trainer: "Trainer") -> None:
        pass

    def before_backward(self, trainer: "Trainer", last: bool) -> None:
        pass

    def write_metrics(self, rec: dict[str, Any]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")


class Trainer:
    """MoE language-model training: one process (LocalPlan) or one expert-parallel rank (a plan
    from cluster/). See module docstring."""

    def __init__(self, run: RunConfig, *, out_dir: str | Path | None = None, data: str | Path | None = None,
                 corpus: Corpus | None = None, progress: bool = True, plots: bool = True,
                 plan: TrainPlan | None = None):
        self.run, self.cfg, self.mcfg = run, run.train, run.model
        self.out_dir = Path(out_dir) if out_dir is not None else Path("runs") / run.name
        self.plan = plan if plan is not None else LocalPlan(self.out_dir)
        self.device = resolve_device(self.cfg.device)
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        if self.cfg.seq_len > self.mcfg.max_seq_len:
            raise ValueError(f"seq_len={self.cfg.seq_len} exceeds the model's max_seq_len={self.mcfg.max_seq_len}; "
                             f"lower seq_len or raise max_seq_len")
        if self.cfg.batch_size % self.plan.world:
            raise ValueError(f"batch_size={self.cfg.batch_size} (the global batch) is not divisible by "
                             f"{self.plan.world} workers; use a multiple of {self.plan.world}")
        # Before anything is built: a config that cannot fit this process's memory is one ConfigError.
        lay = getattr(self.plan, "lay", None)  # an expert-parallel rank holds 1/ep of the experts on its device,
        offloaded = getattr(self.plan, "offload", False)  # none with --offload-experts (they live in host memory)
        check_fits(run, self.device, world=self.plan.world,
                   expert_share=0.0 if offloaded else 1.0 / getattr(lay, "ep", 1))
        self.corpus = corpus or load_corpus(data, vocab_size=self.mcfg.vocab_size)
        self.model = self.plan.build_model(run, self.device)
        self.model.set_activation_checkpointing(self.cfg.activation_checkpointing)
        self.opt = build_optimizer(self.model, self.cfg)
        self.plan.after_init(self)
        self.tracker = balance_tracker(run, self.plan.world, self.plan.count_reducer())
        self.step = 0
        self.tokens_seen = 0
        self.progress, self.plots = progress and self.plan.is_root, plots and self.plan.is_root
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_checkpoint(cls, path: str | Path, *, train_overrides: dict[str, Any] | None = None,
                        **kw) -> "Trainer":
        """A trainer whose config, weights and optimizer come from a checkpoint (or a run dir, or a URI:
        downloaded to a temp dir that is removed once loaded). out_dir defaults to the checkpoint's run
        directory (for a URI: runs/<name>)."""
        with opened_checkpoint(path) as ck:
            d = ck.manifest.config
            if train_overrides:
                d = {**d, "train": {**d["train"], **train_overrides}}
            run = RunConfig.from_dict(d, source=str(ck.path))
            if not is_uri(path):
                kw.setdefault("out_dir", ck.path.parent.parent)
            if run.model.tokenizer_sha256 is not None:  # trained with --tokenizer
                from moe_runtime.core.hf.load import tokenized_data_kwargs
                from moe_runtime.core.tokenizer import checkpoint_tokenizer
                tokenized_data_kwargs(kw, lambda: checkpoint_tokenizer(run, ck.path), run.model.vocab_size,
                                      f"{ck.path}: the model was trained on BPE tokens (tokenizer.json)")
            t = cls(run, **kw)
            t.load(ck)
        return t

    @classmethod
    def from_hf(cls, path: str | Path, train_config: TrainConfig | None = None, **kw) -> "Trainer":
        """Fine-tune a local Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE): a Trainer whose
        model holds the checkpoint's weights (fp32 master weights). train_config: default `finetune_defaults`;
        moe_overrides=: balance-loss options only; max_seq_len=, ignore_config_fields=: as in `load_hf`; the
        rest goes to Trainer (with a tokenizer.json, `data=` text is tokenized with it). See core/hf/."""
        from moe_runtime.core.hf import hf_trainer_inputs, load_hf_weights
        ck, run, kw = hf_trainer_inputs(path, train_config, **kw)
        trainer = cls(run, **kw)
        load_hf_weights(ck, trainer.model)  # in place: the optimizer already holds these parameters
        trainer.model.hf_config = ck.hf_config
        return trainer

    # ------------------------------------------------------------------ training
    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This process's rows of the step's micro-batches."""
        return self.plan.batches(self.corpus, self.cfg, step, self.device)

    fuse_prepass = True
    """With exact global balance and ONE micro-batch per step, the forward that keeps the graph is its
    own pre-pass: its counts are reduced before the loss is formed (no second forward)."""

    def forward_backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> list[MicroLoss]:
        """Balance pre-pass (when exact global counts need it), then forward + backward per
        micro-batch; gradients are left unsynchronised in .grad."""
        c, model = self.cfg, self.model
        model.train()
        if self.tracker.needs_prepass and len(micro) == 1 and self.fuse_prepass:
            return [self._fused_step(*micro[0])]
        with autocast_ctx(self.device, c.autocast_bf16):
            pre = routing_counts(model, [x for x, _ in micro]) if self.tracker.needs_prepass else None
            self.tracker.begin_step(pre)
            self._reset_load_counters()
            parts = []
            for i, (x, y) in enumerate(micro):
                ml = micro_batch_loss(model, x, y, self.tracker, 1.0 / c.grad_accum)
                self.plan.before_backward(self, last=i == len(micro) - 1)
                ml.total.backward()
                parts.append(ml)
        return parts

    def _fused_step(self, x: torch.Tensor, y: torch.Tensor) -> MicroLoss:
        """One micro-batch, exact global counts from its own forward: the same numbers as a no-grad
        pre-pass (same weights, same routing) for one forward less."""
        self._reset_load_counters()
        with autocast_ctx(self.device, self.cfg.autocast_bf16):
            out = self.model(x)
            self.tracker.begin_step(torch.stack([r.counts_E for r in out.routing]))
            ml = micro_batch_loss(self.model, x, y, self.tracker, 1.0, out=out)
            self.plan.before_backward(self, last=True)
            ml.total.backward()
        return ml

    def _reset_load_counters(self) -> None:
        for layer in self.model.moe_layers():  # load reporting counts the gradient pass, not the pre-pass
            if hasattr(layer.dispatcher, "rows_received"):
                layer.dispatcher.rows_received = 0

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        c, model, t0 = self.cfg, self.model, time.perf_counter()
        lr = lr_at(self.step, c)
        for g in self.opt.param_groups:
            g["lr"] = lr
        parts = self.forward_backward(self.batches(self.step))
        gnorm = self.plan.sync_and_clip(model, c.grad_clip if c.grad_clip > 0 else 1e30)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.plan.after_optimizer_step(self)
        counts_LE = self.tracker.end_step()
        for layer, counts_E in zip(model.moe_layers(), counts_LE if counts_LE is not None else []):
            layer.router.update_bias(counts_E)
        self.step += 1
        self.tokens_seen += c.grad_accum * c.batch_size * c.seq_len
        return {"step": self.step, **self.plan.reduce_metrics(parts, model), "lr": lr, "grad_norm": gnorm,
                "t_step": time.perf_counter() - t0, "counts": counts_LE}

    def fit(self, *, resume: bool = True, until_step: int | None = None) -> dict[str, Any]:
        """Train to max_steps (or until_step), resuming from the newest valid checkpoint if any."""
        c = self.cfg
        local_root = self.plan.is_root and self.plan.world == 1
        if local_root:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.step == 0:
            where = self.plan.resume(self)
            if where is not None:
                if self.plan.is_root:
                    print(f"[moe] resuming from {where} (step {self.step})", flush=True)
                self._log({"event": "resumed", "step": self.step, "checkpoint": where})
        elif not resume and self.step == 0 and isinstance(self.plan, LocalPlan):
            # --no-resume starts fresh but never deletes the previous run: its checkpoints move aside
            moved = set_aside(self.out_dir, ["checkpoints", "metrics.jsonl"])
            if moved is not None:
                print(f"[moe] --no-resume: moved the previous run's {' and '.join(moved[1])} to {moved[0]} "
                      f"(kept; delete it when no longer needed)", flush=True)
        if local_root:  # after the resume decision: a refused resume leaves the run's config.json as it was
            (self.out_dir / "config.json").write_text(json.dumps(self.run.to_dict(), indent=2))
        end = min(c.max_steps, until_step if until_step is not None else c.max_steps)
        bar = _progress(self.step, end, self.progress) if self.plan.is_root else _QuietBar()
        try:
            last_eval, m = self._train_until(end, bar)
        finally:  # also on Ctrl-C: the bar ends its line, so what is printed next starts on a fresh one
            bar.close()
        if last_eval is None:  # nothing left to train (a finished run resumed): still report where it stands
            last_eval = self.evaluate()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "last_eval": last_eval, "final_loss": m.get("loss"),
                "out_dir": str(self.out_dir), "history": self.history}

    def _train_until(self, end: int, bar) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """The steps of `fit` up to `end`: (the last eval record or None, the last step's metrics)."""
        c = self.cfg
        t0, tok0, last_eval, m = time.perf_counter(), self.tokens_seen, None, {}
        while self.step < end:
            self.plan.before_step(self)
            m = self.train_step()
            counts = m.pop("counts")
            m["tokens_per_s"] = (self.tokens_seen - tok0) / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
            if self.step % c.log_interval == 0 or self.step == end:
                if counts is not None:
                    m.update({k: v for k, v in balance_metrics(counts).items() if not k.startswith("per_layer")})
                    m["expert_load"] = [int(v) for v in counts.sum(dim=0).tolist()]
                self._log(m)
            if self.step % c.eval_interval == 0 or self.step == c.max_steps:
                last_eval = self.evaluate()
                self._log(last_eval)
                bar.write(f"step {self.step}: val_loss {last_eval['val_loss']:.4f} "
                          f"ppl {last_eval['val_ppl']:.2f} load max/mean {last_eval['load_max_over_mean']:.2f}")
            if (c.ckpt_interval and self.step % c.ckpt_interval == 0) or self.step == c.max_steps:
                self.save()
        return last_eval, m

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> dict[str, Any]:
        """Validation loss / perplexity on fixed batches of the global batch size (so the same
        checkpoint evaluates the same at any layout), expert load and balance metrics, heatmap."""
        p = self.plan
        loss, counts = validation_pass(self.model, self.corpus, self.cfg, self.device, batches,
                                       rank=p.rank, world=p.world)
        loss, counts = p.reduce_eval(loss, counts)
        return eval_report(self.step, loss, None if counts is None else counts.cpu(),
                           self.out_dir / "plots" if self.plots else None, self.run.name)

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / "checkpoints"

    def state_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        t.update(optimizer_tensors(self.model, self.opt))
        return t

    def save(self) -> str:
        return self.plan.save(self)

    def load(self, ck: Checkpoint) -> None:
        """Weights and AdamW state of a checkpoint written at any layout (local plan: all of it)."""
        load_model_state(self.model, ck)
        load_optimizer_tensors(self.model, self.opt,
                               lambda k, p: ck.tensor(k) if k in ck.manifest.tensors else None)
        self.restore_counters(ck)

    def restore_counters(self, ck: Checkpoint) -> None:
        counters = train_counters(ck)  # CheckpointError naming the manifest and the field if one is missing
        self.step, self.tokens_seen = counters["step"], counters["tokens_seen"]

    def _log(self, rec: dict[str, Any]) -> None:
        if not self.plan.is_root:
            return
        rec = {k: v for k, v in rec.items() if not torch.is_tensor(v)}
        self.history.append(rec)
        self.plan.write_metrics(rec)


def _mean_drop_rate(model: MoETransformer) -> float:
    layers = model.moe_layers()
    rates = [getattr(l.dispatcher, "last_drop_rate", 0.0) for l in layers]
    return sum(rates) / max(1, len(rates))


class _NullBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def write(self, s): print(s, flush=True)
    def close(self): pass


class _QuietBar(_NullBar):
    def write(self, s): pass


def _progress(start: int, end: int, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm
    return tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


# Moved to core/modelio.py and core/device.py; kept importable from here for existing callers.
__all__ = ["Trainer", "LocalPlan", "TrainPlan", "micro_batch_loss", "routing_counts", "validation_pass",
           "eval_report", "build_optimizer", "lr_at", "balance_tracker", "load_model", "load_model_state",
           "optimizer_tensors", "load_optimizer_tensors", "resolve_device", "autocast_ctx"]
