"""Global-batch vs micro-batch load balancing: validation loss, domain specialisation and balance.

The CPU study (4 balancing modes x 3 seeds of a shrunk `tiny` model on one thread; ~15 minutes on an
idle core, 29 minutes measured with other jobs sharing the machine):

    python bench/balance_study.py          # or: python -m bench.balance_study

Smoke test (about 20 s; writes to /tmp):

    python bench/balance_study.py --steps 4 --seeds 1 --eval-global-batches 1 --out /tmp/balance_smoke

The `small` preset on one GPU (outputs get the suffix _small_cuda, so the CPU results stay; a run
of a subset of modes adds the modes to the suffix, so two calls of half the modes each fit a
10-minute limit; the heatmap needs micro and global in the same call):

    python bench/balance_study.py --preset small --device cuda --seeds 1
    python bench/balance_study.py --preset small --device cuda --seeds 1 --modes micro,global

Every run trains the same model from the same seed on the same batches for the same steps; only
the balancing differs:
    (a) none      no balance loss, no bias
    (b) micro     LBL = N_E * sum_i f_i p_i with f_i from each micro-batch
    (c) global    the same loss with f_i over the whole global batch (core/router.py, global_sync="exact")
    (d) aux_free  DeepSeek-V3 aux-loss-free per-expert bias, no balance loss
The corpus is core.domains' python / C-header / English-prose corpus with one domain per micro-batch
(the paper's point is that a micro-batch holds few domains while a global batch holds them all);
the global batch is grad_accum = 8 micro-batches. Outputs (bench/results/): balance_study.json,
balance_study.md and balance_study_heatmaps.png. Metrics are defined in core/stats.py.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from moe_runtime.core.config import RunConfig, get_preset, param_count  # noqa: E402
from moe_runtime.core.domains import DomainCorpus, build_domain_corpus  # noqa: E402
from moe_runtime.core.router import BalanceTracker, RouterOutput  # noqa: E402
from moe_runtime.core.stats import (balance_by_granularity, domain_expert_counts, domain_specialisation, layer_agreement,
                       plot_domain_expert_heatmaps, starved_experts, top_experts_per_domain)  # noqa: E402
from moe_runtime.core.train import Trainer, autocast_ctx  # noqa: E402

MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "none": ("(a) no balance loss", dict(balance_coef=0.0, aux_free_bias=False)),
    "micro": ("(b) micro-batch LBL", dict(balance_coef=0.01, balance_scope="micro_batch")),
    "global": ("(c) global-batch LBL", dict(balance_coef=0.01, balance_scope="global_batch", global_sync="exact")),
    "aux_free": ("(d) aux-loss-free bias", dict(balance_coef=0.0, aux_free_bias=True, bias_update_rate=1e-3)),
}
EVAL_SEED = 12345
"""Validation windows are the same for every run (independent of the training seed)."""


def study_run(preset: str, device: str, steps: int | None) -> RunConfig:
    """The preset with the study's batch shape: micro-batch of 4 sequences, 8 micro-batches per step."""
    run = get_preset(preset)
    m, t = run.model, run.train
    if preset == "tiny":
        # Shrunk so that 12 runs take ~15 minutes on one CPU core: 3 MoE layers of 8 experts (top-2)
        # plus one shared expert, width 64, 64-byte sequences.
        m.d_model, m.n_layers, m.n_heads, m.max_seq_len = 64, 3, 4, 64
        m.moe.d_expert, m.moe.d_shared_expert = 64, 64
        t.seq_len, t.max_steps, t.warmup_steps = 64, 500, 20
    else:
        t.max_steps = 1000
    t.batch_size, t.grad_accum = 4, 8
    t.max_steps = steps or t.max_steps
    t.warmup_steps = min(t.warmup_steps, max(1, t.max_steps // 10))
    t.device, t.threads = device, 1 if device == "cpu" else 0
    return run


class RecordingTracker(BalanceTracker):
    """A BalanceTracker that also keeps each micro-batch's expert counts [L, E] while `recording`."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.recording = False
        self.steps: list[list[torch.Tensor]] = []

    def begin_step(self, step_counts_LE: torch.Tensor | None = None) -> None:
        super().begin_step(step_counts_LE)
        if self.recording:
            self.steps.append([])

    def losses(self, outputs: list[RouterOutput]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recording and outputs:
            self.steps[-1].append(torch.stack([o.counts_E for o in outputs]).cpu())  # host sync on GPU
        return super().losses(outputs)

    def micro_counts(self) -> torch.Tensor:
        """[steps, M, L, E] counts of the recorded steps."""
        return torch.stack([torch.stack(s) for s in self.steps])


@torch.no_grad()
def evaluate(trainer: Trainer, corpus: DomainCorpus, global_batches: int) -> dict[str, Any]:
    """Per-domain validation loss and routing on `global_batches` x grad_accum labelled micro-batches
    composed like training batches (one domain per micro-batch), the same windows for every run."""
    model, c = trainer.model, trainer.cfg
    model.eval()
    D, E = corpus.num_domains, model.cfg.moe.num_experts
    nll, ntok = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    topk: list[list[torch.Tensor]] = [[] for _ in model.moe_layers()]
    doms, micro_counts = [], []
    with autocast_ctx(trainer.device, c.autocast_bf16):
        for g in range(global_batches):
            per_micro = []
            for mi in range(c.grad_accum):
                x, y, dom_B = corpus.labelled_batch("val", g, c.batch_size, c.seq_len, seed=EVAL_SEED, micro=mi)
                out = model(x.to(trainer.device))
                ce_BS = F.cross_entropy(out.logits.flatten(0, 1), y.to(trainer.device).flatten(), reduction="none")
                ce_B = ce_BS.view(x.shape).double().sum(dim=1).cpu()
                nll.index_add_(0, dom_B, ce_B)
                ntok.index_add_(0, dom_B, torch.full_like(ce_B, x.shape[1]))
                for layer, r in enumerate(out.routing):
                    topk[layer].append(r.topk_idx_TK.cpu())
                doms.append(dom_B.repeat_interleave(x.shape[1]))
                per_micro.append(torch.stack([r.counts_E for r in out.routing]).cpu())
            micro_counts.append(torch.stack(per_micro))
    model.train()
    topk_LTK = torch.stack([torch.cat(t) for t in topk])
    counts_DLE = domain_expert_counts(topk_LTK, torch.cat(doms), D, E)
    loss_D = (nll / ntok.clamp_min(1)).tolist()
    return {"val_loss": sum(loss_D) / D, "val_loss_per_domain": dict(zip(corpus.domains, loss_D)),
            "specialisation": domain_specialisation(counts_DLE),
            "top_experts_per_domain": top_experts_per_domain(counts_DLE, n=model.cfg.moe.top_k),
            "balance": balance_by_granularity(torch.stack(micro_counts)),
            "experts": starved_experts(counts_DLE.sum(dim=0)),
            "agreement": layer_agreement(topk_LTK, E) if len(topk) > 1 else None,
            "counts_DLE": counts_DLE.tolist()}


def train_one(base: RunConfig, mode: str, seed: int, corpus: DomainCorpus, args) -> dict[str, Any]:
    """Train one (mode, seed) run from scratch and evaluate it."""
    run = copy.deepcopy(base)
    run.name = f"balance-{mode}-s{seed}"
    for k, v in MODES[mode][1].items():
        setattr(run.model.moe, k, v)
    run.model.moe.__post_init__()  # re-validate after the overrides
    run.train.seed = seed
    with tempfile.TemporaryDirectory() as tmp:  # Trainer needs an out_dir; train_step writes nothing
        trainer = Trainer(run, out_dir=tmp, corpus=corpus, progress=False, plots=False)
        trainer.tracker = RecordingTracker(run.model.moe, run.model.num_moe_layers)
        steps = run.train.max_steps
        record_from = steps - max(1, int(steps * args.record_fraction))
        losses, drops, t0 = [], [], time.perf_counter()
        for step in range(steps):
            trainer.tracker.recording = step >= record_from
            m = trainer.train_step()
            losses.append(m["loss"])
            drops.append(m["drop_rate"])
        train_s = time.perf_counter() - t0
        res = evaluate(trainer, corpus, args.eval_global_batches)
    tail = losses[-max(1, steps // 20):]
    res.update({"mode": mode, "seed": seed, "train_seconds": round(train_s, 1),
                "train_loss_end": sum(tail) / len(tail), "drop_rate": sum(drops) / len(drops),
                "train_balance": balance_by_granularity(trainer.tracker.micro_counts()),
                "train_balance_steps": len(trainer.tracker.steps)})
    return res


# ---------------------------------------------------------------- aggregation and reports
SCALARS = {  # report key -> how to read it from a run
    "val_loss": lambda r: r["val_loss"],
    "nmi": lambda r: r["specialisation"]["nmi"],
    "train_micro_max_over_mean": lambda r: r["train_balance"]["micro_max_over_mean"],
    "train_global_max_over_mean": lambda r: r["train_balance"]["global_max_over_mean"],
    "train_micro_cv": lambda r: r["train_balance"]["micro_cv"],
    "train_global_cv": lambda r: r["train_balance"]["global_cv"],
    "eval_micro_max_over_mean": lambda r: r["balance"]["micro_max_over_mean"],
    "eval_global_max_over_mean": lambda r: r["balance"]["global_max_over_mean"],
    "idle_experts": lambda r: r["experts"]["idle_experts"],
    "starved_experts": lambda r: r["experts"]["starved_experts"],
    "drop_rate": lambda r: r["drop_rate"],
    "table_hit_rate": lambda r: r["agreement"]["table_hit_rate"] if r["agreement"] else float("nan"),
    "popular_hit_rate": lambda r: r["agreement"]["popular_hit_rate"] if r["agreement"] else float("nan"),
    "train_seconds": lambda r: r["train_seconds"],
}


def _stat(xs: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "values": xs}


def summarise(runs: list[dict[str, Any]], domains: tuple[str, ...]) -> dict[str, Any]:
    """Per mode: mean, sample sd, min, max over seeds; and paired (same-seed) differences vs micro."""
    out: dict[str, Any] = {}
    for mode in MODES:
        rs = [r for r in runs if r["mode"] == mode]
        if not rs:
            continue
        s = {k: _stat([float(f(r)) for r in rs]) for k, f in SCALARS.items()}
        for d in domains:
            s[f"val_loss_{d}"] = _stat([r["val_loss_per_domain"][d] for r in rs])
        out[mode] = s
    paired = {}
    base = {r["seed"]: r for r in runs if r["mode"] == "micro"}
    for mode in MODES:
        other = {r["seed"]: r for r in runs if r["mode"] == mode}
        seeds = sorted(set(base) & set(other))
        if mode == "micro" or not seeds:
            continue
        paired[f"{mode}-micro"] = {
            k: _stat([float(SCALARS[k](other[s]) - SCALARS[k](base[s])) for s in seeds]) for k in ("val_loss", "nmi")}
    out["paired_vs_micro"] = paired
    return out


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _pm(s: dict[str, Any], fmt: str = ".3f") -> str:
    return f"{s['mean']:{fmt}} ± {s['sd']:{fmt}}"


def _pm_signed(s: dict[str, Any], digits: int) -> str:
    return f"{s['mean']:+.{digits}f} ± {s['sd']:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The markdown tables: mean ± sample sd over seeds."""
    summ, domains, st = report["summary"], report["corpus"]["domains"], report["settings"]
    names = [d["name"] for d in domains]
    mcfg, tcfg = st["model"], st["train"]
    n_seeds = len(st["seeds"])
    lines = [f"# Balance study: micro-batch vs global-batch load balancing ({report['date']})", "",
             f"Machine: {report['machine']['cpu']}, {report['device']}, torch {report['machine']['torch']}, "
             f"{report['machine']['threads']} thread(s). Total wall time {report['wall_seconds'] / 60:.1f} min.", "",
             f"Model: preset `{st['preset']}`{' shrunk' if st['preset'] == 'tiny' else ''}: d_model={mcfg['d_model']}, "
             f"{mcfg['n_layers']} layers ({mcfg['n_layers'] - mcfg['first_dense_layers']} MoE), "
             f"{mcfg['moe']['num_experts']} experts top-{mcfg['moe']['top_k']}, d_expert={mcfg['moe']['d_expert']}, "
             f"{mcfg['moe']['num_shared_experts']} shared expert; {st['param_count']['total']:,} parameters. "
             f"Training: {tcfg['max_steps']} steps, micro-batch {tcfg['batch_size']} x {tcfg['seq_len']} bytes, "
             f"grad_accum {tcfg['grad_accum']} (global batch = {tcfg['grad_accum']}x the micro-batch, "
             f"{tcfg['batch_size'] * tcfg['seq_len'] * tcfg['grad_accum']} tokens/step), lr {tcfg['lr']}, "
             f"warm-up {tcfg['warmup_steps']}, cosine to {tcfg['min_lr_ratio']}x; balance_coef 0.01 for (b) and (c), "
             f"bias_update_rate 1e-3 for (d). Seeds {st['seeds']} (init and batches); mean ± sample sd over "
             f"{n_seeds} seed(s).", "",
             f"Corpus ({report['corpus']['mixing']} mixing: each micro-batch is one domain): " +
             ", ".join(f"{d['name']} {d['train_bytes'] // 1000} kB train / {d['val_bytes'] // 1000} kB val "
                       f"({d['train_docs']}/{d['val_docs']} docs)" for d in domains) + ".", "",
             f"Validation: {st['eval_global_batches']} global batches x {tcfg['grad_accum']} micro-batches of "
             f"{tcfg['batch_size']} sequences, the same windows for every run.", "",
             "## Loss and specialisation", "",
             "| mode | val loss (mean of domains, nats/byte) | " + " | ".join(names) +
             " | specialisation NMI | next-layer hit rate: table / popular |",
             "|---|---|" + "---|" * len(names) + "---|---|"]
    for mode, (label, _) in MODES.items():
        if mode not in summ:
            continue
        s = summ[mode]
        lines.append(f"| {label} | {_pm(s['val_loss'])} | " + " | ".join(_pm(s[f'val_loss_{n}']) for n in names) +
                     f" | {_pm(s['nmi'])} | {s['table_hit_rate']['mean']:.3f} / {s['popular_hit_rate']['mean']:.3f} |")
    lines += ["", "## Balance (max/mean load, 1 = perfect) and dead experts", "",
              "| mode | micro-batch max/mean (train) | global-batch max/mean (train) | micro-batch CV (train) "
              "| global-batch CV (train) | micro / global max/mean (val) | idle / starved experts (val, all layers) "
              "| dropped |",
              "|---|---|---|---|---|---|---|---|"]
    for mode, (label, _) in MODES.items():
        if mode not in summ:
            continue
        s = summ[mode]
        lines.append(f"| {label} | {_pm(s['train_micro_max_over_mean'], '.2f')} | "
                     f"{_pm(s['train_global_max_over_mean'], '.2f')} | {_pm(s['train_micro_cv'], '.2f')} | "
                     f"{_pm(s['train_global_cv'], '.2f')} | {s['eval_micro_max_over_mean']['mean']:.2f} / "
                     f"{s['eval_global_max_over_mean']['mean']:.2f} | {s['idle_experts']['mean']:.1f} / "
                     f"{s['starved_experts']['mean']:.1f} | {s['drop_rate']['mean']:.0%} |")
    if summ.get("paired_vs_micro"):
        lines += ["", "## Paired differences against (b), same seed", "",
                  "| comparison | Δ val loss | Δ NMI | seeds where val loss is lower |", "|---|---|---|---|"]
        for key, p in summ["paired_vs_micro"].items():
            lower = sum(v < 0 for v in p["val_loss"]["values"])
            lines.append(f"| {MODES[key.split('-')[0]][0]} − (b) | {_pm_signed(p['val_loss'], 4)} | "
                         f"{_pm_signed(p['nmi'], 3)} | {lower} of {len(p['val_loss']['values'])} |")
    lines += ["", "Train balance is over the micro-batches of the last "
              f"{st['record_fraction']:.0%} of steps; starved = below 10% of the fair share; NMI = I(domain; expert) / "
              "H(domain) per layer, averaged over layers (core/stats.py). Hit rates: predicting layer l+1's "
              "top-k from layer l's with a transition table vs always the most popular experts.", ""]
    if report.get("figure"):
        lines.append(f"![expert-by-domain heatmaps]({Path(report['figure']).name})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", help="model preset (tiny is shrunk, see study_run)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per mode")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: 500 tiny, 1000 otherwise)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--eval-global-batches", type=int, default=12, help="validation global batches")
    ap.add_argument("--record-fraction", type=float, default=0.2, help="last fraction of steps whose "
                    "micro-batch counts give the train balance")
    ap.add_argument("--max-bytes", type=int, default=1_500_000, help="bytes per domain")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="output directory")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        ap.error(f"--modes {args.modes!r}: unknown {bad}; choose from {','.join(MODES)}")
    if args.device == "cpu":
        torch.set_num_threads(1)
    base = study_run(args.preset, args.device, args.steps)
    corpus = build_domain_corpus(max_bytes=args.max_bytes, max_doc_bytes=16_384, val_fraction=0.1)
    print(f"corpus: {corpus.source}", flush=True)
    t0, runs = time.perf_counter(), []
    for seed in range(args.seeds):
        for mode in modes:
            r = train_one(base, mode, seed, corpus, args)
            runs.append(r)
            print(f"{MODES[mode][0]:<26} seed {seed}: val {r['val_loss']:.4f} nmi {r['specialisation']['nmi']:.3f} "
                  f"train micro/global max/mean {r['train_balance']['micro_max_over_mean']:.2f}/"
                  f"{r['train_balance']['global_max_over_mean']:.2f} ({r['train_seconds']:.0f} s)", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if (args.preset, args.device) == ("tiny", "cpu") else f"_{args.preset}_{args.device.replace(':', '')}"
    if modes != list(MODES):
        suffix += "_" + "-".join(modes)
    report: dict[str, Any] = {
        "version": 1, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": args.device, "machine": machine(), "wall_seconds": round(time.perf_counter() - t0, 1),
        "command": "python bench/balance_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"preset": args.preset, "seeds": list(range(args.seeds)), "modes": {m: MODES[m][1] for m in modes},
                     "eval_global_batches": args.eval_global_batches, "eval_seed": EVAL_SEED,
                     "record_fraction": args.record_fraction, "model": base.to_dict()["model"],
                     "train": base.to_dict()["train"], "param_count": param_count(base.model)},
        "corpus": corpus.describe(), "summary": summarise(runs, corpus.domains), "runs": runs}
    first = {r["mode"]: r for r in runs if r["seed"] == 0}
    if "micro" in first and "global" in first:
        fig = plot_domain_expert_heatmaps(
            {MODES[m][0]: torch.tensor(first[m]["counts_DLE"]) for m in ("micro", "global")}, corpus.domains,
            out / f"balance_study{suffix}_heatmaps.png", f"share of each domain's routed assignments, seed 0, "
                                                          f"{args.preset} on {args.device}")
        report["figure"] = str(fig)
    (out / f"balance_study{suffix}.json").write_text(json.dumps(report, indent=1))
    (out / f"balance_study{suffix}.md").write_text(markdown(report))
    print(f"wrote {out / f'balance_study{suffix}.json'} and .md ({report['wall_seconds'] / 60:.1f} min)", flush=True)
    return report


if __name__ == "__main__":
    main()
