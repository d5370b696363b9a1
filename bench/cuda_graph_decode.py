"""Decode step time, eager vs CUDA graphs (issue 23 item 3), through the expert-cache engine with
every expert in a slot, as `moe serve --cuda-graphs` runs it.

    python bench/cuda_graph_decode.py                       # mixtral-tiny shape, batches 1, 8, 16, CUDA
    python bench/cuda_graph_decode.py --d-model 1024 --layers 8 --batches 1 16

For each batch size B: two DecodeBatches over the same model (eager, cuda_graphs=True), each with
B sequences of different prompt lengths (rows at different positions, as a server's are), then
steps alternate eager / graph (--reps rounds of --steps steps each, after warm-up); a step is timed
from the host until its tokens are on the host (DecodeBatch.step syncs on them). The greedy tokens
of both must be equal. Writes bench/results/cuda_graph_decode_<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_runtime.core.config import ModelConfig, MoEConfig  # noqa: E402
from moe_runtime.core.generation import SamplingParams  # noqa: E402
from moe_runtime.core.model import init_model  # noqa: E402
from moe_runtime.offload.engine import ExpertCacheEngine  # noqa: E402
from moe_runtime.offload.report import device_name, utc_now  # noqa: E402


def filled(engine, B: int, graphs: bool, new_tokens: int, max_len: int):
    """A DecodeBatch with B prefilled sequences (prompts of 8 .. 8+3(B-1) tokens)."""
    batch = engine.decode_batch(max_batch=B, max_len=max_len, max_prefill_tokens=256, cuda_graphs=graphs)
    if graphs:
        t = time.perf_counter()
        batch.graphs.capture_all()
        capture_s = time.perf_counter() - t
    else:
        capture_s = None
    prompts = [[(7 * i + j) % 200 + 1 for j in range(8 + 3 * i)] for i in range(B)]
    batch.add(prompts, [SamplingParams(max_new_tokens=new_tokens)] * B, defer=True)
    while any(s.prefilling for s in batch.running):
        batch.step()
    return batch, capture_s


def run_batch(engine, B: int, args) -> dict:
    new = args.reps * args.steps + args.warmup + 2
    (eager, _), (graph, capture_s) = filled(engine, B, False, new, args.max_len), filled(engine, B, True, new,
                                                                                           args.max_len)
    times = {"eager": [], "graph": []}
    for _ in range(args.warmup):
        eager.step(), graph.step()
    for r in range(args.reps):
        for name, batch in (("eager", eager), ("graph", graph)) if r % 2 == 0 else (("graph", graph), ("eager", eager)):
            for _ in range(args.steps):
                t = time.perf_counter()
                batch.step()  # ends with the tokens on the host (a sync)
                times[name].append(time.perf_counter() - t)
    same = [s.tokens for s in eager.running] == [s.tokens for s in graph.running]
    e, g = statistics.median(times["eager"]), statistics.median(times["graph"])
    return {"batch": B, "eager_step_ms": e * 1e3, "graph_step_ms": g * 1e3, "speedup": e / g,
            "capture_s": capture_s, "buckets": sorted(graph.graphs.graphs), "tokens_equal": same,
            "steps_timed": len(times["eager"])}


def markdown(res: dict) -> str:
    m = res["model"]
    lines = [f"# Decode step, eager vs CUDA graphs ({res['device_name']}, {res['date']})", "",
             f"Model: Mixtral-shaped, L={m['layers']} D={m['d_model']} E={m['experts']} top-{m['top_k']} "
             f"({m['params'] / 1e6:.2f}M parameters, random init, {res['dtype']}), every expert in a slot of the "
             f"expert-cache engine; rows at different positions; median of {res['rows'][0]['steps_timed']} steps "
             f"each, eager and graph steps alternating in blocks of {res['steps']}. torch {res['torch']}.", "",
             "| batch | eager step (ms) | graph step (ms) | speedup | capture (s) | greedy tokens equal |",
             "|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['batch']} | {r['eager_step_ms']:.3f} | {r['graph_step_ms']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['capture_s']:.2f} | {r['tokens_equal']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=512, help="context per row (graphs attend over all of it)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=4, max_seq_len=max(4096, args.max_len),
                      moe=MoEConfig(num_experts=args.experts, top_k=2, d_expert=args.d_model))
    model = init_model(cfg, seed=0).to(getattr(torch, args.dtype))
    engine = ExpertCacheEngine(model, gpu_expert_slots=cfg.n_layers * args.experts, device=args.device)
    rows = [run_batch(engine, B, args) for B in args.batches]
    for r in rows:
        print(json.dumps(r), flush=True)
    res = {"device": args.device, "device_name": device_name(dev) if dev.type == "cuda" else "cpu",
           "date": utc_now(), "torch": torch.__version__, "dtype": args.dtype, "steps": args.steps,
           "model": {"layers": cfg.n_layers, "d_model": cfg.d_model, "experts": args.experts, "top_k": 2,
                     "params": sum(p.numel() for p in model.parameters()) + engine.store.layout.total_experts
                     * 3 * cfg.d_model * cfg.moe.d_expert}, "rows": rows}
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / f"cuda_graph_decode_{dev.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2))
    stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0 if all(r["tokens_equal"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
