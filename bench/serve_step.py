"""One decode step in-process, no HTTP (issue 23): `moe serve`'s step (a DecodeBatch through the
expert-cache engine, every expert in a slot) next to transformers' Mixtral forward with a
DynamicCache on the same exported weights, at batch 1 and 16, on one intra-op thread.

    python bench/serve_step.py                        # trains the tiny Mixtral-shaped run first (~1 min)
    python bench/serve_step.py --checkpoint runs/x    # a Mixtral-shaped byte-vocabulary run

Rounds alternate which side goes first (3 steps each, --rounds rounds); the medians of thread CPU
time (what the step costs the core it runs on, least disturbed by other processes) and of wall
time are reported. Our step includes its bookkeeping (sampling, stop checks, text); transformers'
is the bare forward plus argmax, so the comparison leans its way. Writes
bench/results/serve_step_cpu.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serve import cpu_model, export_for_transformers, train_checkpoint  # noqa: E402

from moe_runtime.core.generation import SamplingParams  # noqa: E402
from moe_runtime.core.train import load_model  # noqa: E402
from moe_runtime.offload.engine import ExpertCacheEngine  # noqa: E402
from moe_runtime.offload.report import utc_now  # noqa: E402


def our_step(ckpt: Path, B: int, steps: int):
    """moe serve's decode step for B sequences at different positions (prompts of 8 + i tokens)."""
    model, _, _ = load_model(str(ckpt), device="cpu")
    E = model.cfg.num_moe_layers * model.cfg.moe.num_experts
    batch = ExpertCacheEngine(model, gpu_expert_slots=E, device="cpu").decode_batch(
        max_batch=B, max_len=1024, decode=lambda ids: bytes(ids).decode("utf-8", "replace"), max_prefill_tokens=256)
    batch.add([[65 + i % 20] * (8 + i) for i in range(B)], [SamplingParams(max_new_tokens=steps)] * B, defer=True)
    while any(s.prefilling for s in batch.running):
        batch.step()
    return batch.step


def their_step(hf, B: int):
    from transformers import DynamicCache
    out = hf(torch.randint(1, 200, (B, 40)), past_key_values=DynamicCache(), use_cache=True)
    state = {"cache": out.past_key_values, "next": out.logits[:, -1:].argmax(-1)}

    def step():
        o = hf(state["next"], past_key_values=state["cache"], use_cache=True)
        state["cache"], state["next"] = o.past_key_values, o.logits[:, -1:].argmax(-1)
        state["next"].tolist()  # tokens on the host, as a server needs them
    return step


@torch.no_grad()
def measure(ckpt: Path, hf, B: int, rounds: int) -> dict:
    sides = {"moe": our_step(ckpt, B, 6 * rounds + 8), "transformers": their_step(hf, B)}
    cpu, wall = {k: [] for k in sides}, {k: [] for k in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            for _ in range(3):
                c, t = time.thread_time(), time.perf_counter()
                sides[name]()
                cpu[name].append(time.thread_time() - c)
                wall[name].append(time.perf_counter() - t)
    med = {k: (statistics.median(cpu[k]) * 1e3, statistics.median(wall[k]) * 1e3) for k in sides}
    return {"batch": B, "moe_cpu_ms": med["moe"][0], "moe_wall_ms": med["moe"][1],
            "transformers_cpu_ms": med["transformers"][0], "transformers_wall_ms": med["transformers"][1],
            "cpu_ratio": med["transformers"][0] / med["moe"][0], "load_average_1m": os.getloadavg()[0]}


def markdown(res: dict) -> str:
    loads = ", ".join(f"{r['load_average_1m']:.1f}" for r in res["rows"])
    lines = [f"# Decode step in-process: moe serve's vs transformers' forward ({res['device_name']}, {res['date']})", "",
             f"Model `{res['model']}` (Mixtral-shaped, L=4 D=128 E=8 top-2), same weights (export_hf); one intra-op "
             f"thread; {res['rounds']} alternating rounds of 3 steps; medians. transformers {res['transformers']}, "
             f"torch {res['torch']}. Load average (1 min) during the runs: "
             f"{loads} (a shared host: thread CPU time is the "
             f"figure to read).", "",
             "| batch | moe step CPU (ms) | transformers step CPU (ms) | transformers / moe CPU | moe wall (ms) | "
             "transformers wall (ms) |", "|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {r['moe_cpu_ms']:.3f} | {r['transformers_cpu_ms']:.3f} | {r['cpu_ratio']:.2f}x | "
                     f"{r['moe_wall_ms']:.3f} | {r['transformers_wall_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_step_cpu"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    import transformers
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory(prefix="bench-serve-step-") as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else train_checkpoint(Path(tmp) / "run", args.train_steps, 3600)
        hf = AutoModelForCausalLM.from_pretrained(export_for_transformers(ckpt, Path(tmp) / "hf"),
                                                  dtype=torch.float32).eval()
        rows = [measure(ckpt, hf, B, args.rounds) for B in args.batches]
        _, run, _ = load_model(str(ckpt), device="cpu")
    res = {"device_name": f"CPU: {cpu_model()}", "date": utc_now(), "model": run.name, "rounds": args.rounds,
           "transformers": transformers.__version__, "torch": torch.__version__, "rows": rows}
    Path(args.out).with_suffix(".json").write_text(json.dumps(res, indent=2))
    Path(args.out).with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
