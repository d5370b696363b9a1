"""Trainer: the Python training API.

    from moe import Trainer, get_preset
    trainer = Trainer(get_preset("tiny"), out_dir="runs/tiny")
    summary = trainer.fit()

One optimizer step = `grad_accum` micro-batches. Per micro-batch the loss is
    cross-entropy + balance_coef * LBL + z_loss_coef * z-loss      (divided by grad_accum)
with LBL's f_i formed as documented in moe/router.py. Data batches depend only on (seed, step,
micro-batch), so resuming from a checkpoint continues exactly like an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe.checkpoint import Checkpoint, CheckpointError, latest_checkpoint, resume_check, save_checkpoint
from moe.config import RunConfig, TrainConfig
from moe.data import Corpus, load_corpus
from moe.model import MoETransformer
from moe.router import BalanceTracker
from moe.stats import balance_metrics, plot_expert_load


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' or None: CUDA when available, else the CPU; anything else must exist here."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use --device cpu")
    return dev


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
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def autocast_ctx(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class MicroLoss:
    """`total` carries the graph; the parts are detached 0-d tensors (no host sync per micro-batch)."""
    total: torch.Tensor
    ce: torch.Tensor
    balance: torch.Tensor
    z: torch.Tensor


def micro_batch_loss(model: MoETransformer, x_BS: torch.Tensor, y_BS: torch.Tensor, tracker: BalanceTracker,
                     scale: float = 1.0) -> MicroLoss:
    """Forward one micro-batch; `total` is ready for backward (already multiplied by scale)."""
    out = model(x_BS)
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


@torch.no_grad()
def validation_pass(model: MoETransformer, corpus: Corpus, cfg: TrainConfig, device: torch.device,
                    batches: int | None = None, *, rank: int = 0, world: int = 1
                    ) -> tuple[float, torch.Tensor | None]:
    """Mean cross-entropy over the fixed validation batches (this rank's rows) and the [L, E]
    expert counts they routed (on device; None for a model without MoE layers)."""
    model.eval()
    n = batches or cfg.eval_batches
    total, counts = 0.0, None
    with autocast_ctx(device, cfg.autocast_bf16):
        for i in range(n):
            x, y = (t.to(device) for t in corpus.batch("val", i, cfg.batch_size, cfg.seq_len, seed=cfg.seed,
                                                       rank=rank, world=world))
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


def optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name: optim/<name>/exp_avg, .../exp_avg_sq, .../step."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(float(v))
            out[f"optim/{names[id(p)]}/{k}"] = t
    return out


def load_optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer,
                           get: Callable[[str, nn.Parameter], torch.Tensor | None]) -> None:
    """Restore AdamW state; get(key, param) returns the stored tensor (sliced for this rank) or None."""
    for name, p in model.named_parameters():
        state = {}
        for k in ("exp_avg", "exp_avg_sq", "step"):
            t = get(f"optim/{name}/{k}", p)
            if t is not None:
                state[k] = t.to(p.device) if k != "step" else t.float().cpu()
        if state:
            opt.state[p] = state


class Trainer:
    """Single-process MoE language-model training. See module docstring."""

    def __init__(self, run: RunConfig, *, out_dir: str | Path | None = None, data: str | Path | None = None,
                 corpus: Corpus | None = None, progress: bool = True, plots: bool = True):
        self.run, self.cfg, self.mcfg = run, run.train, run.model
        self.out_dir = Path(out_dir) if out_dir is not None else Path("runs") / run.name
        self.device = resolve_device(self.cfg.device)
        if self.cfg.threads > 0:
            torch.set_num_threads(self.cfg.threads)
        self.corpus = corpus or load_corpus(data, vocab_size=self.mcfg.vocab_size)
        if self.cfg.seq_len > self.mcfg.max_seq_len:
            raise ValueError(f"seq_len={self.cfg.seq_len} exceeds the model's max_seq_len={self.mcfg.max_seq_len}; "
                             f"lower seq_len or raise max_seq_len")
        torch.manual_seed(self.cfg.seed)
        self.model = MoETransformer(self.mcfg).to(self.device)
        self.opt = build_optimizer(self.model, self.cfg)
        self.tracker = BalanceTracker(self.mcfg.moe, self.mcfg.num_moe_layers)
        self.step = 0
        self.tokens_seen = 0
        self.progress, self.plots = progress, plots
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_checkpoint(cls, path: str | Path, *, train_overrides: dict[str, Any] | None = None,
                        **kw) -> "Trainer":
        """A trainer whose config, weights and optimizer come from a checkpoint (or a run dir)."""
        ck = Checkpoint(_resolve_ckpt(path))
        d = ck.manifest.config
        if train_overrides:
            d = {**d, "train": {**d["train"], **train_overrides}}
        run = RunConfig.from_dict(d, source=str(ck.path))
        kw.setdefault("out_dir", ck.path.parent.parent)
        t = cls(run, **kw)
        t.load(ck)
        return t

    @classmethod
    def from_hf(cls, path: str | Path, train_config: TrainConfig | None = None, **kw) -> "Trainer":
        """Fine-tune a local Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE); see moe/hf.py."""
        from moe.hf import trainer_from_hf
        return trainer_from_hf(path, train_config, **kw)

    # ------------------------------------------------------------------ training
    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.cfg
        return [tuple(t.to(self.device) for t in self.corpus.batch("train", step, c.batch_size, c.seq_len,
                                                                    seed=c.seed, micro=m))
                for m in range(c.grad_accum)]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches; returns its metrics."""
        c, model = self.cfg, self.model
        model.train()
        lr = lr_at(self.step, c)
        for g in self.opt.param_groups:
            g["lr"] = lr
        micro = self.batches(self.step)
        with autocast_ctx(self.device, c.autocast_bf16):
            pre = routing_counts(model, [x for x, _ in micro]) if self.tracker.needs_prepass else None
            self.tracker.begin_step(pre)
            parts = []
            for x, y in micro:
                ml = micro_batch_loss(model, x, y, self.tracker, 1.0 / c.grad_accum)
                ml.total.backward()
                parts.append(ml)
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip if c.grad_clip > 0 else 1e30))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        counts_LE = self.tracker.end_step()
        for layer, counts_E in zip(model.moe_layers(), counts_LE if counts_LE is not None else []):
            layer.router.update_bias(counts_E)
        self.step += 1
        self.tokens_seen += c.grad_accum * c.batch_size * c.seq_len
        # host sync: one transfer of the step's loss parts, for logging
        ce, bal, z = torch.stack([torch.stack([p.ce, p.balance, p.z]) for p in parts]).mean(0).tolist()
        return {"step": self.step, "loss": ce, "balance_loss": bal, "z_loss": z, "lr": lr, "grad_norm": gnorm,
                "drop_rate": _mean_drop_rate(model), "counts": counts_LE}

    def fit(self, *, resume: bool = True, until_step: int | None = None) -> dict[str, Any]:
        """Train to max_steps (or until_step), resuming from the newest valid checkpoint if any."""
        c = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.step == 0:
            # integrity: skips corrupted checkpoints (reason printed), refuses another run's (ResumeMismatch)
            params = [n for n, p in self.model.named_parameters() if p.requires_grad]
            last = latest_checkpoint(self.ckpt_root, check=resume_check(self.run.to_dict(), params))
            if last is not None:
                self.load(Checkpoint(last))
                self._log({"event": "resumed", "step": self.step, "checkpoint": str(last)})
        (self.out_dir / "config.json").write_text(json.dumps(self.run.to_dict(), indent=2))
        end = min(c.max_steps, until_step if until_step is not None else c.max_steps)
        bar = _progress(self.step, end, self.progress)
        t0, tok0 = time.perf_counter(), self.tokens_seen
        last_eval = None
        while self.step < end:
            m = self.train_step()
            counts = m.pop("counts")
            dt = time.perf_counter() - t0
            m["tokens_per_s"] = (self.tokens_seen - tok0) / max(dt, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
            if self.step % c.log_interval == 0 or self.step == end:
                if counts is not None:
                    m.update({k: v for k, v in balance_metrics(counts).items() if not k.startswith("per_layer")})
                self._log(m)
            if self.step % c.eval_interval == 0 or self.step == c.max_steps:
                last_eval = self.evaluate()
                self._log(last_eval)
                bar.write(f"step {self.step}: val_loss {last_eval['val_loss']:.4f} "
                          f"ppl {last_eval['val_ppl']:.2f} load max/mean {last_eval['load_max_over_mean']:.2f}")
            if (c.ckpt_interval and self.step % c.ckpt_interval == 0) or self.step == c.max_steps:
                self.save()
        bar.close()
        if last_eval is None:  # nothing left to train (a finished run resumed): still report where it stands
            last_eval = self.evaluate()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "last_eval": last_eval,
                "out_dir": str(self.out_dir)}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> dict[str, Any]:
        """Validation loss / perplexity on fixed batches, expert load and balance metrics, heatmap."""
        loss, counts = validation_pass(self.model, self.corpus, self.cfg, self.device, batches)
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

    def save(self) -> Path:
        state = {"step": self.step, "tokens_seen": self.tokens_seen}
        return save_checkpoint(self.ckpt_root, self.step, self.state_tensors(), self.run.to_dict(), state,
                               keep=self.cfg.keep_checkpoints)

    def load(self, ck: Checkpoint) -> None:
        load_model_state(self.model, ck)
        load_optimizer_tensors(self.model, self.opt,
                               lambda k, p: ck.tensor(k) if k in ck.manifest.tensors else None)
        self.step = int(ck.manifest.train_state["step"])
        self.tokens_seen = int(ck.manifest.train_state.get("tokens_seen", 0))

    def _log(self, rec: dict[str, Any]) -> None:
        rec = {k: v for k, v in rec.items() if not torch.is_tensor(v)}
        self.history.append(rec)
        with open(self.out_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def load_model_state(model: nn.Module, ck: Checkpoint, rows_for: Callable[[str], slice | None] | None = None) -> None:
    """Copy model/<name> tensors into model; rows_for(name) selects a row slice (expert parallel)."""
    sd = model.state_dict()
    missing = [k for k in sd if f"model/{k}" not in ck.manifest.tensors]
    if missing:
        raise CheckpointError(f"checkpoint {ck.path} lacks model tensors {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                              f"it was written for a different model config")
    new = {}
    for k, v in sd.items():
        rows = rows_for(k) if rows_for else None
        t = ck.tensor(f"model/{k}", rows)
        if t.shape != v.shape:
            raise CheckpointError(f"checkpoint {ck.path}: {k} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(v.shape)}")
        new[k] = t
    model.load_state_dict(new)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MoETransformer, RunConfig, Checkpoint]:
    """A model from a checkpoint dir or a run dir (its newest valid checkpoint)."""
    ck = Checkpoint(_resolve_ckpt(path))
    run = RunConfig.from_dict(ck.manifest.config, source=str(ck.path))
    model = MoETransformer(run.model)
    load_model_state(model, ck)
    return model.to(device).eval(), run, ck


def _resolve_ckpt(path: str | Path) -> Path:
    p = Path(path)
    if (p / "manifest.msgpack").exists():
        return p
    for root in (p / "checkpoints", p):
        last = latest_checkpoint(root)
        if last is not None:
            return last
    raise CheckpointError(f"no valid checkpoint under {p}; pass a run directory written by `moe train` "
                          f"or a checkpoints/step_NNNNNNNN directory")


def _mean_drop_rate(model: MoETransformer) -> float:
    layers = model.moe_layers()
    rates = [getattr(l.dispatcher, "last_drop_rate", 0.0) for l in layers]
    return sum(rates) / max(1, len(rates))


class _NullBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def write(self, s): print(s, flush=True)
    def close(self): pass


def _progress(start: int, end: int, enabled: bool):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm
    return tqdm(total=end, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


__all__ = ["Trainer", "micro_batch_loss", "routing_counts", "validation_pass", "eval_report", "build_optimizer", "lr_at", "load_model",
           "load_model_state", "optimizer_tensors", "load_optimizer_tensors", "resolve_device"]
