"""The `moe` command (also `python -m moe`).

    moe train                                  tiny preset, default corpus, ~2 minutes on a laptop CPU
    moe train --preset small --data my.txt     another preset, your text
    moe train --config examples/configs/small.toml --workers 4 --ep 2   Ray Train workers, expert parallel
    moe eval runs/tiny                         validation loss / perplexity of the newest checkpoint
    moe generate --checkpoint runs/tiny --gpu-expert-slots 8 --policy predictive
    moe trace simulate trace.msgpack           replay a routing trace through every cache policy
    moe presets                                list the named presets
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from moe.config import PRESETS, RunConfig, get_preset, load_config, param_count


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (single process, or Ray workers with --workers)",
                       description="Train an MoE language model. With no arguments: the tiny preset on the "
                                   "Python standard library's source, on CPU, in about two minutes.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None, choices=sorted(PRESETS), help="named preset (default: tiny)")
    src.add_argument("--config", default=None, help="TOML or JSON config with [model], [model.moe], [train]")
    p.add_argument("--data", default=None, help="text file, directory of text files, or .bin uint16 token file "
                                                "(default: the Python standard library's .py files)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<name>)")
    p.add_argument("--name", default=None, help="run name (default: the preset or config name)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (0 = default)")
    p.add_argument("--eval-interval", type=int, default=None)
    p.add_argument("--ckpt-interval", type=int, default=None)
    p.add_argument("--balance-scope", choices=["micro_batch", "global_batch"], default=None,
                   help="where the load-balancing loss takes its expert frequencies from")
    p.add_argument("--global-sync", choices=["exact", "cumulative"], default=None,
                   help="global-batch semantics over accumulation micro-batches (see moe/router.py)")
    p.add_argument("--balance-coef", type=float, default=None, help="load-balancing loss weight (0 = off)")
    p.add_argument("--aux-free-bias", action="store_true", help="DeepSeek-V3 aux-loss-free bias balancing")
    p.add_argument("--activation-checkpointing", choices=["none", "full", "selective"], default=None,
                   help="recompute blocks (full) or attention only (selective) in backward to save activations")
    p.add_argument("--no-resume", action="store_true", help="start fresh even if the run dir has checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    g = p.add_argument_group("cluster (Ray Train; needs moe-runtime[ray])")
    g.add_argument("--workers", type=int, default=0,
                   help="train on N Ray Train workers (an embedded local Ray unless one is running; 0: one process)")
    g.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: gcd(workers, num_experts))")
    g.add_argument("--storage", default=None,
                   help="checkpoint storage: an absolute directory or a URI (s3://...); relative paths resolve "
                        "against the current directory (refused inside `ray job submit`); default ./runs. "
                        "The run goes to <storage>/<name>")
    g.add_argument("--max-failures", type=int, default=3, help="worker failures to recover from")
    g.add_argument("--collective-timeout", type=float, default=120.0,
                   help="seconds before a stuck collective fails and names the rank that stopped")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPU cores per worker bundle (fractions ok)")
    g.add_argument("--offload-experts", action="store_true", help="expert shards + AdamW state in host memory")
    g.add_argument("--overlap-grad-sync", choices=["auto", "on", "off"], default="auto",
                   help="all-reduce dense gradients during backward (on) or after it (off); auto: on with GPUs")
    g.add_argument("--ray-address", default=None, help="Ray cluster to join ('auto': the running one; default: RAY_ADDRESS, else a new local one)")
    p.set_defaults(func=cmd_train)


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """Preset or config file, then command-line overrides, validated again."""
    run = load_config(args.config) if args.config else get_preset(args.preset or "tiny")
    t, m = run.train, run.model.moe
    for flag, attr in (("max_steps", "max_steps"), ("batch_size", "batch_size"), ("seq_len", "seq_len"),
                       ("grad_accum", "grad_accum"), ("lr", "lr"), ("seed", "seed"), ("device", "device"),
                       ("threads", "threads"), ("eval_interval", "eval_interval"),
                       ("activation_checkpointing", "activation_checkpointing"),
                       ("ckpt_interval", "ckpt_interval")):
        v = getattr(args, flag)
        if v is not None:
            setattr(t, attr, v)
    for flag in ("balance_scope", "global_sync", "balance_coef"):
        v = getattr(args, flag)
        if v is not None:
            setattr(m, flag, v)
    if args.aux_free_bias:
        m.aux_free_bias = True
    if t.eval_interval > t.max_steps:
        t.eval_interval = t.max_steps
    if args.name:
        run.name = args.name
    # Re-run validation on the overridden values.
    return RunConfig.from_dict(run.to_dict(), source="command line")


def cmd_train(args: argparse.Namespace) -> int:
    run = build_run_config(args)
    if args.workers:
        return _train_cluster(run, args)
    out = Path(args.out) if args.out else Path("runs") / run.name
    counts = param_count(run.model)
    print(f"[moe] {run.name}: {counts['total'] / 1e6:.2f}M parameters, {counts['active'] / 1e6:.2f}M active per "
          f"token; {run.model.moe.num_experts} experts top-{run.model.moe.top_k}; balance "
          f"{run.model.moe.balance_scope} coef {run.model.moe.balance_coef}; run dir {out}", flush=True)
    from moe.train import Trainer
    trainer = Trainer(run, out_dir=out, data=args.data, progress=not args.no_progress)
    print(f"[moe] data: {trainer.corpus.source}; unigram baseline "
          f"{trainer.corpus.unigram_entropy():.4f} nats/token", flush=True)
    summary = trainer.fit(resume=not args.no_resume)
    ev = summary.get("last_eval") or {}
    if ev:
        print(f"[moe] done at step {summary['step']}: val_loss {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.2f}); "
              f"checkpoints in {out / 'checkpoints'}, metrics in {out / 'metrics.jsonl'}, "
              f"expert-load heatmap {out / 'plots' / 'expert_load_latest.png'}")
    return 0


def _train_cluster(run: RunConfig, args: argparse.Namespace) -> int:
    """`moe train --workers N`: a Ray Train job (cluster/job.py); failures print one line."""
    from cluster.job import ClusterTrainingError, run_cluster_train
    try:
        summary = run_cluster_train(run, args)
    except ClusterTrainingError as e:
        print(f"moe train: error: {e}", file=sys.stderr)
        return 1
    ev = summary.get("last_eval") or {}
    print(f"[moe] done at step {summary['step']}: val_loss {ev.get('val_loss', float('nan')):.4f}; checkpoints and "
          f"metrics.jsonl in {summary['run_dir']}", flush=True)
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss and perplexity of a run's newest checkpoint",
                       description="Evaluate the newest valid checkpoint of RUN_DIR (or a checkpoint directory).")
    p.add_argument("run_dir", help="run directory written by `moe train`, or a checkpoints/step_* directory")
    p.add_argument("--data", default=None, help="evaluate on this data instead of the default corpus")
    p.add_argument("--batches", type=int, default=None, help="validation batches (default: the run's eval_batches)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the result as JSON to this path")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from moe.train import Trainer
    overrides = {"device": args.device}
    if args.batches:
        overrides["eval_batches"] = args.batches
    trainer = Trainer.from_checkpoint(args.run_dir, train_overrides=overrides, data=args.data, progress=False,
                                      plots=False)
    res = trainer.evaluate()
    res["unigram_baseline"] = trainer.corpus.unigram_entropy()
    res["data"] = trainer.corpus.source
    print(f"step {res['step']}: val_loss {res['val_loss']:.4f} nats/token, perplexity {res['val_ppl']:.3f} "
          f"(unigram baseline {res['unigram_baseline']:.4f} nats, ppl {math.exp(res['unigram_baseline']):.2f}); "
          f"expert load max/mean {res.get('load_max_over_mean', float('nan')):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def _add_presets(sub) -> None:
    p = sub.add_parser("presets", help="list the named presets", description="List presets and their sizes.")
    p.set_defaults(func=cmd_presets)


def cmd_presets(args: argparse.Namespace) -> int:
    for name in PRESETS:
        r = get_preset(name)
        c = param_count(r.model)
        m = r.model.moe
        print(f"{name:15s} {c['total'] / 1e6:10.1f}M params {c['active'] / 1e6:9.1f}M active  "
              f"L={r.model.n_layers} D={r.model.d_model} E={m.num_experts} K={m.top_k} F={m.d_expert}")
    return 0


def _add_offload(sub) -> None:
    from offload.engine import add_generate_args, run_generate
    p = sub.add_parser("generate", help="generate text with the expert cache (experts in host memory)",
                       description="Generate from a checkpoint with experts held in host memory and a fixed "
                                   "pool of device expert slots.")
    add_generate_args(p)
    p.set_defaults(func=run_generate)
    from offload.trace import add_trace_args, run_trace
    p = sub.add_parser("trace", help="record routing traces and replay them through the cache simulator",
                       description="Routing traces: record from a checkpoint, simulate cache policies.")
    add_trace_args(p)
    p.set_defaults(func=run_trace)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_eval(sub)
    _add_offload(sub)
    _add_presets(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"moe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"moe {args.command}: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    raise SystemExit(main())
