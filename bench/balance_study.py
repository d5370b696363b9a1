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

The token-level study (`--tokens`): six domains (python, C headers, English prose, and German,
French and Spanish manual pages, which `bash scripts/study-corpus.sh` fetches first), a byte-level
BPE of 4096 tokens trained on the train split (saved as <work>/tokenizer.json), a 4-layer all-MoE
model of 16 experts top-2, seven arms x 3 seeds in 2 worker processes of one thread each:

    bash scripts/study-corpus.sh
    python bench/balance_study.py --tokens          # bench/results/balance_study_tokens.{md,json,_heatmaps.png}
    python bench/balance_study.py --tokens --report-only   # re-aggregate the finished runs in --work

Arms: (a) none, (b) micro-batch LBL, (c) global-batch LBL exact, (d) global-batch LBL cumulative,
(e) aux-loss-free bias, all on domain-pure micro-batches; plus (b) and (c) on mixed micro-batches,
the control in which the two should not differ. Finished runs are kept in --work (default
runs/balance_tokens/), so an interrupted study resumes with the same command.

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
import math
import os
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
from moe_runtime.core.stats import (balance_by_granularity, domain_expert_counts, domain_specialisation,  # noqa: E402
                                    domain_topk_share, layer_agreement, per_domain_nmi, plot_domain_expert_heatmaps,
                                    starved_experts, top_experts_per_domain)
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
            "per_domain_nmi": per_domain_nmi(counts_DLE)["per_domain"],
            "topk_share": domain_topk_share(counts_DLE, model.cfg.moe.top_k),
            "top_experts_per_domain": top_experts_per_domain(counts_DLE, n=model.cfg.moe.top_k),
            "balance": balance_by_granularity(torch.stack(micro_counts)),
            "experts": starved_experts(counts_DLE.sum(dim=0)),
            "agreement": layer_agreement(topk_LTK, E) if len(topk) > 1 else None,
            "counts_DLE": counts_DLE.tolist()}


def train_one(base: RunConfig, mode: str, seed: int, corpus: DomainCorpus, args,
              overrides: dict[str, Any] | None = None, mixing: str = "domain") -> dict[str, Any]:
    """Train one (mode, seed) run from scratch on `mixing` micro-batches and evaluate it (always on
    domain-pure validation micro-batches, the same windows for every run)."""
    run = copy.deepcopy(base)
    run.name = f"balance-{mode}-s{seed}"
    corpus.mixing = mixing
    for k, v in (MODES[mode][1] if overrides is None else overrides).items():
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
        corpus.mixing = "domain"
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


# ---------------------------------------------------------------- the token-level study (--tokens)
TOKEN_MODES: dict[str, tuple[str, dict[str, Any], str]] = {  # key -> (label, MoE overrides, micro-batch mixing)
    "none": ("(a) no balancing", dict(balance_coef=0.0, aux_free_bias=False), "domain"),
    "micro": ("(b) micro-batch LBL", dict(balance_coef=0.01, balance_scope="micro_batch"), "domain"),
    "global": ("(c) global-batch LBL, exact", dict(balance_coef=0.01, balance_scope="global_batch",
                                                   global_sync="exact"), "domain"),
    "cumulative": ("(d) global-batch LBL, cumulative", dict(balance_coef=0.01, balance_scope="global_batch",
                                                            global_sync="cumulative"), "domain"),
    "aux_free": ("(e) aux-loss-free bias", dict(balance_coef=0.0, aux_free_bias=True, bias_update_rate=1e-3),
                 "domain"),
    "micro_mixed": ("(b) micro-batch LBL, mixed micro-batches", dict(balance_coef=0.01, balance_scope="micro_batch"),
                    "mixed"),
    "global_mixed": ("(c) global-batch LBL, mixed micro-batches", dict(balance_coef=0.01, balance_scope="global_batch",
                                                                       global_sync="exact"), "mixed"),
}
TOKEN_DEFAULTS = dict(steps=100, vocab=4096, max_bytes=900_000, max_doc_bytes=16_384, val_fraction=0.1)


def token_study_run(steps: int, vocab_size: int, num_domains: int, tokenizer_sha256: str | None = None) -> RunConfig:
    """The token study's model: d_model 128, 4 MoE layers (no dense layer, no shared expert, so
    every FFN token goes through the router) of 16 experts top-2, d_expert 128; micro-batch 4 x 128
    tokens; grad_accum = the number of domains, so each global batch holds every domain once."""
    run = get_preset("tiny")
    m, t = run.model, run.train
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len, m.first_dense_layers = vocab_size, 128, 4, 4, 128, 0
    m.moe.num_experts, m.moe.top_k, m.moe.d_expert = 16, 2, 128
    m.moe.num_shared_experts, m.moe.d_shared_expert = 0, 0
    t.seq_len, t.batch_size, t.grad_accum = 128, 4, num_domains
    t.max_steps, t.warmup_steps, t.lr = steps, max(1, min(20, steps // 10)), 3e-3
    t.device, t.threads = "cpu", 1
    m.tokenizer_sha256 = tokenizer_sha256
    run.model.__post_init__()
    return run


def token_corpus(work: Path, args, log=print) -> tuple[DomainCorpus, dict[str, Any]]:
    """The six-domain corpus encoded with the study's BPE: trained on the train split and saved as
    work/tokenizer.json on the first call, loaded (sha256-checked) from there afterwards."""
    from moe_runtime.core.domains import domain_documents, study_sources
    from moe_runtime.core.tokenizer import file_sha256, load_tokenizer_file, save_tokenizer, train_bpe
    docs = domain_documents(study_sources(), max_bytes=args.max_bytes, max_doc_bytes=TOKEN_DEFAULTS["max_doc_bytes"],
                            val_fraction=TOKEN_DEFAULTS["val_fraction"], log=log)
    tok_path = work / "tokenizer.json"
    t0 = time.perf_counter()
    if tok_path.is_file():
        tok, sha = load_tokenizer_file(tok_path)
    else:
        tok = train_bpe([t for d in docs for t in d.texts("train")], args.vocab)
        sha = save_tokenizer(tok, tok_path)
    bpe_s = time.perf_counter() - t0
    corpus = build_domain_corpus(documents=docs, tokenizer=tok)
    return corpus, {"path": str(tok_path), "sha256": sha, "vocab_size": tok.get_vocab_size(),
                    "train_seconds": round(bpe_s, 2), "file_sha256_check": file_sha256(tok_path) == sha}


def _token_run_file(work: Path, mode: str, seed: int) -> Path:
    return work / f"run-{mode}-s{seed}.json"


def run_token_one(args) -> None:
    """Worker: train and evaluate one (mode, seed) of the token study; writes work/run-MODE-sSEED.json."""
    torch.set_num_threads(1)
    work = Path(args.work)
    mode, seed = args.run_one.split(":")
    seed = int(seed)
    corpus, tok_info = token_corpus(work, args, log=lambda m: None)
    base = token_study_run(args.steps, corpus.vocab_size, corpus.num_domains, tok_info["sha256"])
    label, overrides, mixing = TOKEN_MODES[mode]
    started = time.time()
    r = train_one(base, mode, seed, corpus, args, overrides=overrides, mixing=mixing)
    r.update(settings_key=args.settings_key, started_unix=round(started, 1), finished_unix=round(time.time(), 1))
    tmp = _token_run_file(work, mode, seed).with_suffix(".tmp")
    tmp.write_text(json.dumps(r))
    tmp.replace(_token_run_file(work, mode, seed))


TOKEN_SCALARS = dict(SCALARS, topk_share=lambda r: r["topk_share"]["mean"])


def summarise_tokens(runs: list[dict[str, Any]], domains: tuple[str, ...]) -> dict[str, Any]:
    """Per arm: mean, sample sd, min, max over seeds (overall and per domain); paired same-seed
    differences of every domain-pure arm against (b), and of (c) mixed against (b) mixed."""
    out: dict[str, Any] = {}
    for mode in TOKEN_MODES:
        rs = sorted((r for r in runs if r["mode"] == mode), key=lambda r: r["seed"])
        if not rs:
            continue
        s = {k: _stat([float(f(r)) for r in rs]) for k, f in TOKEN_SCALARS.items()}
        for i, d in enumerate(domains):
            s[f"val_loss_{d}"] = _stat([r["val_loss_per_domain"][d] for r in rs])
            s[f"nmi_{d}"] = _stat([r["per_domain_nmi"][i] for r in rs])
            s[f"topk_share_{d}"] = _stat([r["topk_share"]["per_domain"][i] for r in rs])
        out[mode] = s
    paired: dict[str, Any] = {}
    keys = ["val_loss", "nmi", "topk_share", "train_micro_max_over_mean", "train_global_max_over_mean"]
    keys += [f"val_loss_{d}" for d in domains]
    pairs = [(m, "micro") for m in ("none", "global", "cumulative", "aux_free")] + [("global_mixed", "micro_mixed"),
                                                                                    ("micro_mixed", "micro")]
    for a, b in pairs:
        ra = {r["seed"]: r for r in runs if r["mode"] == a}
        rb = {r["seed"]: r for r in runs if r["mode"] == b}
        seeds = sorted(set(ra) & set(rb))
        if not seeds:
            continue

        def val(r, k):
            if k.startswith("val_loss_"):
                return r["val_loss_per_domain"][k[len("val_loss_"):]]
            return float(TOKEN_SCALARS[k](r))
        paired[f"{a}-{b}"] = {k: _stat([val(ra[sd], k) - val(rb[sd], k) for sd in seeds]) for k in keys}
        paired[f"{a}-{b}"]["seeds"] = seeds
    out["paired"] = paired
    return out


def _direction(p: dict[str, Any], key: str) -> str:
    """'higher'/'lower' with the paired mean ± sd and how many seeds agree in sign."""
    v = p[key]["values"]
    n_lo, n = sum(x < 0 for x in v), len(v)
    mean, sd = p[key]["mean"], p[key]["sd"]
    same_sign = n_lo in (0, n)
    return (f"{'lower' if mean < 0 else 'higher'} ({mean:+.4f} ± {sd:.4f}; lower in {n_lo} of {n} seeds, "
            f"{'the same sign in every seed' if same_sign else 'the sign differs between seeds'}; "
            f"|mean| / sd = {abs(mean) / sd if sd > 0 else float('inf'):.1f})")


def markdown_tokens(report: dict[str, Any]) -> str:
    """The token study's tables: mean ± sample sd over seeds, per domain, paired differences."""
    summ, st = report["summary"], report["settings"]
    names = [d["name"] for d in report["corpus"]["domains"]]
    mcfg, tcfg = st["model"], st["train"]
    lab = {m: v[0] for m, v in TOKEN_MODES.items()}
    arms = [m for m in TOKEN_MODES if m in summ]
    tok = report["tokenizer"]
    tokens_per_step = tcfg["batch_size"] * tcfg["seq_len"] * tcfg["grad_accum"]
    L = [f"# Balance study, token level: micro-batch vs global-batch load balancing ({report['date']})", "",
         f"Machine: {report['machine']['cpu']}, cpu, torch {report['machine']['torch']}, "
         f"{st['jobs']} process(es) x 1 thread in parallel. Wall time {report['study_span_seconds'] / 60:.1f} min from the "
         f"first run's start to the last run's end ({report['run_seconds_total'] / 60:.0f} process-minutes). "
         f"Command: `{report['command']}` (after `bash scripts/study-corpus.sh`).", "",
         f"Model: d_model={mcfg['d_model']}, {mcfg['n_layers']} layers, all MoE, {mcfg['moe']['num_experts']} "
         f"experts top-{mcfg['moe']['top_k']}, d_expert={mcfg['moe']['d_expert']}, no shared expert, vocab "
         f"{mcfg['vocab_size']} (byte-level BPE trained on the train split, sha256 {tok['sha256'][:16]}...); "
         f"{st['param_count']['total']:,} parameters. Training: {tcfg['max_steps']} steps, micro-batch "
         f"{tcfg['batch_size']} x {tcfg['seq_len']} tokens, grad_accum {tcfg['grad_accum']} (one micro-batch per "
         f"domain in a global batch), {tokens_per_step} tokens/step, {tokens_per_step * tcfg['max_steps']:,} "
         f"tokens per run (the same in every arm), lr {tcfg['lr']}, warm-up {tcfg['warmup_steps']}, cosine to "
         f"{tcfg['min_lr_ratio']}x. balance_coef 0.01 for the LBL arms, bias rate 1e-3 for (e). Seeds "
         f"{st['seeds']} (init and batches; arm pairs share them); mean ± sample sd over seeds.", "",
         "Corpus (tokens train / val): " + ", ".join(
             f"{d['name']} {d['train_tokens'] // 1000}k / {d['val_tokens'] // 1000}k ({d['train_bytes'] // 1000} kB "
             f"text)" for d in report["corpus"]["domains"]) + ". Domain-pure arms: micro-batch m of step t is "
         "domain (t + m) % 6; mixed arms: every sequence draws its domain.", "",
         f"How much the token id alone says about the domain, NMI(domain; token) over the train split: "
         f"{report['token_domain_nmi']['bpe']:.3f} with this BPE, {report['token_domain_nmi']['bytes']:.3f} for the "
         f"same text as bytes.", "",
         f"For scale: the train split's unigram distribution scores {report['unigram_val_loss']:.3f} nats/token on "
         f"the validation split (all domains pooled); ln {mcfg['vocab_size']} = {math.log(mcfg['vocab_size']):.3f}.", "",
         f"Validation: {st['eval_global_batches']} x {tcfg['grad_accum']} domain-pure micro-batches of "
         f"{tcfg['batch_size']} sequences (the same windows in every run, "
         f"{st['eval_global_batches'] * tcfg['batch_size'] * tcfg['seq_len']} tokens per domain). Loss in nats/token.",
         "", "## Overall", "",
         "| arm | val loss | NMI(domain; expert) | top-2 share | max/mean load, global batch (train) | "
         "max/mean load, micro-batch (train) | starved experts |", "|---|---|---|---|---|---|---|"]
    for m in arms:
        s = summ[m]
        L.append(f"| {lab[m]} | {_pm(s['val_loss'], '.4f')} | {_pm(s['nmi'])} | {_pm(s['topk_share'])} | "
                 f"{_pm(s['train_global_max_over_mean'], '.2f')} | {_pm(s['train_micro_max_over_mean'], '.2f')} | "
                 f"{s['starved_experts']['mean']:.1f} |")
    for title, key, fmt in (("Validation loss per domain (nats/token)", "val_loss", ".3f"),
                            ("One-vs-rest NMI per domain", "nmi", ".3f"),
                            ("Share of a domain's assignments on its top-2 experts (uniform 0.125)", "topk_share", ".3f")):
        L += ["", f"## {title}", "", "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for m in arms:
            L.append(f"| {lab[m]} | " + " | ".join(_pm(summ[m][f'{key}_{n}'], fmt) for n in names) + " |")
    if summ.get("paired"):
        L += ["", "## Paired differences (same seed)", "",
              "| comparison | Δ val loss | Δ NMI | Δ top-2 share | Δ global max/mean | seeds with lower val loss |",
              "|---|---|---|---|---|---|"]
        for key, p in summ["paired"].items():
            a, b = key.split("-")
            lower = sum(v < 0 for v in p["val_loss"]["values"])
            L.append(f"| {lab[a]} − {lab[b]} | {_pm_signed(p['val_loss'], 4)} | {_pm_signed(p['nmi'], 3)} | "
                     f"{_pm_signed(p['topk_share'], 3)} | {_pm_signed(p['train_global_max_over_mean'], 2)} | "
                     f"{lower} of {len(p['seeds'])} |")
        L += ["", "Per-domain Δ val loss:", "", "| comparison | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
        for key, p in summ["paired"].items():
            a, b = key.split("-")
            L.append(f"| {lab[a]} − {lab[b]} | " + " | ".join(_pm_signed(p[f'val_loss_{n}'], 4) for n in names) + " |")
        cb = summ["paired"].get("global-micro")
        if cb:
            L += ["", "## Direction: (c) global-batch exact vs (b) micro-batch, domain-pure micro-batches", "",
                  f"- NMI: (c) − (b) is {_direction(cb, 'nmi')}.",
                  f"- Val loss: (c) − (b) is {_direction(cb, 'val_loss')}."]
        cm = summ["paired"].get("global_mixed-micro_mixed")
        if cm:
            L += [f"- Control, mixed micro-batches: (c) − (b) NMI {_pm_signed(cm['nmi'], 3)}, "
                  f"val loss {_pm_signed(cm['val_loss'], 4)}."]
    L += ["", "NMI = I(domain; expert) / H(domain) over routed assignments, per layer, mean over layers; per-domain "
          "NMI is one-vs-rest; top-2 share = the fraction of a domain's assignments on its two most-used experts "
          "(core/stats.py). Load balance: max/mean of the expert counts of each global batch (sum of its micro-"
          f"batches) and of each micro-batch, over the last {st['record_fraction']:.0%} of training steps; "
          "starved = below 10% of the fair share on the validation set, all layers.", ""]
    if report.get("figure"):
        L.append(f"![expert-by-domain heatmaps]({Path(report['figure']).name})")
    return "\n".join(L) + "\n"


def main_tokens(args, argv: list[str] | None) -> dict[str, Any]:
    """The token-level study: corpus + BPE once, then every (arm, seed) in `args.jobs` worker
    processes of one thread each; finished runs are kept in the work directory, so an interrupted
    study resumes where it stopped (with the same settings)."""
    import subprocess
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    modes = [m for m in args.modes.split(",") if m] if args.modes else list(TOKEN_MODES)
    bad = [m for m in modes if m not in TOKEN_MODES]
    if bad or not modes:
        raise SystemExit(f"--modes {args.modes!r}: unknown {bad}; choose from {','.join(TOKEN_MODES)}")
    corpus, tok_info = token_corpus(work, args)
    print(f"corpus: {corpus.source}; BPE vocab {tok_info['vocab_size']} sha256 {tok_info['sha256'][:16]}", flush=True)
    base = token_study_run(args.steps, corpus.vocab_size, corpus.num_domains, tok_info["sha256"])
    key = json.dumps({"steps": args.steps, "vocab": args.vocab, "max_bytes": args.max_bytes, "tok": tok_info["sha256"],
                      "eval": args.eval_global_batches, "rec": args.record_fraction, "model": base.to_dict()})
    key = f"{zlib_crc(key):08x}"
    todo = [(m, s) for s in range(args.seeds) for m in modes]
    if args.report_only:  # aggregate the finished runs in the work directory (one settings key), train nothing
        missing = [f"{m}:{s}" for m, s in todo if not _token_run_file(work, m, s).is_file()]
        if missing:
            raise SystemExit(f"--report-only: no finished run for {', '.join(missing)} in {work}; run without "
                             f"--report-only to train them")
        keys = {json.loads(_token_run_file(work, m, s).read_text())["settings_key"] for m, s in todo}
        if len(keys) != 1:
            raise SystemExit(f"--report-only: the runs in {work} were made with different settings ({sorted(keys)}); "
                             f"re-run them with one set of options")
        key = keys.pop()
    t0 = time.perf_counter()
    running: list[tuple[subprocess.Popen, str, int, float]] = []
    pending = []
    for m, s in todo:
        f = _token_run_file(work, m, s)
        if f.is_file() and json.loads(f.read_text()).get("settings_key") == key:
            print(f"{TOKEN_MODES[m][0]:<44} seed {s}: done earlier ({f.name})", flush=True)
            continue
        pending.append((m, s))
    script = str(Path(__file__).resolve())
    common = ["--tokens", "--work", str(work), "--steps", str(args.steps), "--vocab", str(args.vocab),
              "--max-bytes", str(args.max_bytes), "--eval-global-batches", str(args.eval_global_batches),
              "--record-fraction", str(args.record_fraction), "--settings-key", key]
    failed = []
    while pending or running:
        while pending and len(running) < args.jobs:
            m, s = pending.pop(0)
            log = open(work / f"run-{m}-s{s}.log", "w")
            p = subprocess.Popen([sys.executable, script, *common, "--run-one", f"{m}:{s}"], stdout=log,
                                 stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                    TOKENIZERS_PARALLELISM="false"))
            running.append((p, m, s, time.perf_counter()))
        time.sleep(2)
        for item in list(running):
            p, m, s, ts = item
            if p.poll() is None:
                continue
            running.remove(item)
            f = _token_run_file(work, m, s)
            if p.returncode != 0 or not f.is_file():
                failed.append((m, s))
                print(f"{TOKEN_MODES[m][0]:<44} seed {s}: FAILED (exit {p.returncode}); see {work}/run-{m}-s{s}.log",
                      flush=True)
                continue
            r = json.loads(f.read_text())
            print(f"{TOKEN_MODES[m][0]:<44} seed {s}: val {r['val_loss']:.4f} nmi {r['specialisation']['nmi']:.3f} "
                  f"top2 {r['topk_share']['mean']:.3f} global max/mean {r['train_balance']['global_max_over_mean']:.2f} "
                  f"({r['train_seconds']:.0f} s train, {time.perf_counter() - ts:.0f} s total; "
                  f"{(time.perf_counter() - t0) / 60:.1f} min elapsed)", flush=True)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {failed}; fix and re-run the same command (finished runs are kept)")
    runs = [json.loads(_token_run_file(work, m, s).read_text()) for m, s in todo]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "version": 1, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": "cpu",
        "machine": machine(), "wall_seconds": round(time.perf_counter() - t0, 1),
        "study_span_seconds": round(max(r["finished_unix"] for r in runs) - min(r["started_unix"] for r in runs), 1),
        "run_seconds_total": round(sum(r["finished_unix"] - r["started_unix"] for r in runs), 1),
        "run_seconds_max": round(max(r["finished_unix"] - r["started_unix"] for r in runs), 1),
        "command": "python bench/balance_study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "tokenizer": tok_info,
        "settings": {"seeds": list(range(args.seeds)), "jobs": args.jobs, "settings_key": key,
                     "modes": {m: {"label": TOKEN_MODES[m][0], "moe": TOKEN_MODES[m][1], "mixing": TOKEN_MODES[m][2]}
                               for m in modes},
                     "eval_global_batches": args.eval_global_batches, "eval_seed": EVAL_SEED,
                     "record_fraction": args.record_fraction, "model": base.to_dict()["model"],
                     "train": base.to_dict()["train"], "param_count": param_count(base.model)},
        "corpus": corpus.describe(), "token_domain_nmi": token_domain_nmi(corpus, args),
        "unigram_val_loss": corpus.unigram_entropy(),
        "summary": summarise_tokens(runs, corpus.domains), "runs": runs}
    first = {r["mode"]: r for r in runs if r["seed"] == 0}
    panels = {TOKEN_MODES[m][0].split(" ")[0] + (" mixed" if TOKEN_MODES[m][2] == "mixed" else ""):
              torch.tensor(first[m]["counts_DLE"]) for m in TOKEN_MODES if m in first}
    if panels:
        fig = plot_domain_expert_heatmaps(panels, corpus.domains, out / "balance_study_tokens_heatmaps.png",
                                          "share of each domain's routed assignments (validation), seed 0")
        report["figure"] = str(fig)
    (out / "balance_study_tokens.json").write_text(json.dumps(report, indent=1))
    (out / "balance_study_tokens.md").write_text(markdown_tokens(report))
    print(f"wrote {out / 'balance_study_tokens.json'} and .md ({report['wall_seconds'] / 60:.1f} min)", flush=True)
    return report


def token_domain_nmi(corpus: DomainCorpus, args) -> dict[str, float]:
    """NMI(domain; token id) of the train splits, for the BPE corpus and for the same text as bytes:
    how much a router could tell about the domain from the token alone, before any context."""
    from moe_runtime.core.domains import domain_documents, study_sources
    from moe_runtime.core.stats import mutual_information_bits

    def nmi(parts: list[torch.Tensor], V: int) -> float:
        mi, h, _ = mutual_information_bits(torch.stack([torch.bincount(p, minlength=V) for p in parts]))
        return round(mi / h, 4)
    docs = domain_documents(study_sources(), max_bytes=args.max_bytes, max_doc_bytes=TOKEN_DEFAULTS["max_doc_bytes"],
                            val_fraction=TOKEN_DEFAULTS["val_fraction"], log=lambda m: None)
    return {"bpe": nmi(corpus.train_parts, corpus.vocab_size),
            "bytes": nmi(build_domain_corpus(documents=docs).train_parts, 256)}


def zlib_crc(text: str) -> int:
    import zlib
    return zlib.crc32(text.encode())


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
    ap.add_argument("--tokens", action="store_true", help="the token-level study: 6 domains (needs "
                    "scripts/study-corpus.sh), a byte-level BPE, 7 arms; writes balance_study_tokens.*")
    ap.add_argument("--vocab", type=int, default=TOKEN_DEFAULTS["vocab"], help="--tokens: BPE vocabulary size")
    ap.add_argument("--jobs", type=int, default=2, help="--tokens: runs in parallel, one thread each")
    ap.add_argument("--work", default="runs/balance_tokens", help="--tokens: tokenizer.json, per-run JSON and logs "
                    "(finished runs are reused when the settings match)")
    ap.add_argument("--report-only", action="store_true", help="--tokens: write the report from the finished runs "
                    "in --work (all arms x seeds must be there, made with one set of settings); train nothing")
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--settings-key", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tokens:
        args.steps = args.steps or TOKEN_DEFAULTS["steps"]
        if args.max_bytes == 1_500_000:
            args.max_bytes = TOKEN_DEFAULTS["max_bytes"]
        if args.run_one:
            run_token_one(args)
            return {}
        if args.modes == ",".join(MODES):
            args.modes = ""
        return main_tokens(args, argv)
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
