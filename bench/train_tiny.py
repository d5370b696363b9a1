"""Time `moe train` on its embedded default (tiny preset, stdlib corpus) and record the quality numbers.

    python bench/train_tiny.py                 # writes bench/results/train_tiny_<device>.{json,md}
    python bench/train_tiny.py --preset small --device cuda --max-steps 500

Reports wall time, training tokens/s (median of the logged intervals), final validation loss and
perplexity, and the unigram-entropy baseline of the corpus (the best context-free predictor).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_runtime.core.config import get_preset, param_count  # noqa: E402
from moe_runtime.core.train import Trainer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    run = get_preset(args.preset)
    run.train.device = args.device
    if args.max_steps:
        run.train.max_steps = args.max_steps
        run.train.eval_interval = min(run.train.eval_interval, args.max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(run, out_dir=tmp, progress=False, plots=False)
        summary = trainer.fit(resume=False)
        wall = time.perf_counter() - t0
    dev = trainer.device
    tok_s = statistics.median(h["tokens_per_s"] for h in trainer.history if "tokens_per_s" in h)
    ev = summary["last_eval"]
    base = trainer.corpus.unigram_entropy()
    res = {"preset": args.preset, "device": dev.type,
           "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else
           f"CPU {platform.machine()} x{torch.get_num_threads()} threads",
           "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
           "steps": summary["step"], "tokens": summary["tokens_seen"], "wall_s": wall, "tokens_per_s": tok_s,
           "val_loss": ev["val_loss"], "val_ppl": ev["val_ppl"], "unigram_baseline_nats": base,
           "unigram_baseline_ppl": math.exp(base), "params": param_count(run.model),
           "load_max_over_mean": ev.get("load_max_over_mean"), "data": trainer.corpus.source}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"train_{args.preset}_{dev.type}"
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    md = (f"`moe train --preset {args.preset}` on {res['device_name']}, torch {res['torch']}, {res['date']}\n\n"
          "| steps | tokens | wall s | train tokens/s | val loss (nats/byte) | val ppl | unigram baseline (nats) | "
          "expert load max/mean |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
          f"| {res['steps']} | {res['tokens']:,} | {wall:.1f} | {tok_s:,.0f} | {res['val_loss']:.4f} | "
          f"{res['val_ppl']:.2f} | {base:.4f} | {res['load_max_over_mean']:.3f} |\n")
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
