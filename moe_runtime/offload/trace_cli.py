"""`moe trace`: record routing traces from a checkpoint, replay them through the cache simulator,
and compare routing predictors.

    moe trace record --checkpoint runs/tiny --out runs/tiny/trace.msgpack --max-new-tokens 128
    moe trace record --checkpoint runs/tiny --out runs/tiny/trace.msgpack --corpus-batches 8   # corpus text
    moe trace simulate runs/tiny/trace.msgpack --capacities 25%,50%,75% --policies lru,lfu,predictive,oracle
    moe trace simulate runs/tiny/trace.msgpack --model-shape mixtral-8x7b --link h100-pcie5   # projected tokens/s
    moe trace simulate runs/tiny/trace.msgpack --model-shape mixtral-8x7b --link h100-pcie5 --expert-dtype bf16,int4
    moe trace predictors --checkpoint runs/tiny --trace runs/tiny/trace.msgpack
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moe_runtime.core.cli import RawDescriptionDefaultsFormatter
from moe_runtime.kernels.quant import EXPERT_DTYPES
from moe_runtime.offload.projection import LINKS, SHAPES
from moe_runtime.offload.simulate import SIM_POLICIES


def register(sub) -> None:
    """`moe trace` (entry point in the `moe_runtime.commands` group, see core/cli.py)."""
    p = sub.add_parser("trace", help="record routing traces and replay them through the cache simulator",
                       description="Routing traces: record from a checkpoint, simulate cache policies.")
    add_trace_args(p)
    p.set_defaults(func=run_trace)


def add_trace_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="trace_command", metavar="ACTION", required=True)
    r = sub.add_parser("record", help="record a routing trace from a checkpoint (generation or corpus text)",
                       description="Run a checkpoint's model (every expert resident) and write which experts each "
                                   "token chose at every MoE layer, with their combine weights, to a sealed msgpack "
                                   "trace: generated text from --prompt, or --corpus-batches of corpus text.")
    r.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    r.add_argument("--out", required=True, help="trace file to write (msgpack)")
    r.add_argument("--prompt", default="def ", help="prompt for generation (byte-level models)")
    r.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens to generate (default: up to the model's max_seq_len)")
    r.add_argument("--batch", type=int, default=1, help="sequences per forward pass (copies of the prompt, or "
                                                          "corpus rows per batch)")
    r.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    r.add_argument("--corpus-batches", type=int, default=0,
                   help="record N teacher-forced corpus batches instead of generating")
    r.add_argument("--seq-len", type=int, default=64, help="sequence length of corpus batches")
    r.add_argument("--data", default=None, help="corpus for --corpus-batches (default: the standard library)")
    r.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    r.add_argument("--seed", type=int, default=0, help="sampling seed and corpus batch seed")
    s = sub.add_parser("simulate", help="replay a trace for every policy and capacity",
                       formatter_class=RawDescriptionDefaultsFormatter,
                       description="Replay a routing trace through the expert-cache simulator (the engine's own "
                                   "planner and cost\nmodel) for every policy and capacity: hits, copies, bytes and "
                                   "modelled time per token,\nunder the trace's recorded calibration (or "
                                   "--copy-ms/--attn-ms/--expert-ms), or projected onto\na real model shape and "
                                   "host link (--model-shape with --link), per expert format at equal slot memory with\n"
                                   "--expert-dtype. Policies:\n" + policy_help())
    s.add_argument("trace", help="trace file")
    s.add_argument("--capacities", default="25%,50%,75%", help="slots or percentages of all experts, comma-separated")
    s.add_argument("--policies", default=",".join(SIM_POLICIES),
                   help="comma-separated, from the list above (default: all of them)")
    s.add_argument("--depth", type=int, default=1, help="lookahead depth (MoE layers) of the predictive policies")
    s.add_argument("--copy-ms", type=float, default=None, help="override: ms per expert copy (default: the "
                                                                "trace's recorded calibration)")
    s.add_argument("--attn-ms", type=float, default=None, help="override: ms of non-expert compute per layer "
                                                                "(default: the trace's recorded calibration)")
    s.add_argument("--expert-ms", type=float, default=None, help="override: ms per expert run (default: the "
                                                                  "trace's recorded calibration)")
    s.add_argument("--model-shape", default=None, help="project onto a real shape: " + ", ".join(SHAPES))
    s.add_argument("--link", default=None, help="with --model-shape: the host link, one of " + ", ".join(LINKS))
    s.add_argument("--expert-dtype", default=None, metavar="FORMATS",
                   help="with --model-shape: experts in these formats, comma-separated from "
                        f"{', '.join(EXPERT_DTYPES)} (bytes per expert from kernels/quant.py; --capacities then "
                        "name slot memory in bf16 experts and each format gets the slots that memory holds; host "
                        "time per format from --host-ratios). Default: the shape's own format, no format rows")
    s.add_argument("--expert-group", type=int, default=None, help="int4 group size (32..128, default 64)")
    s.add_argument("--host-ratios", default=None, metavar="PATH",
                   help="JSON whose host_expert_path rows give each format's host time vs bf16 (default: "
                        "bench/results/quant_quality.json, written by bench/quant_quality.py)")
    s.add_argument("--cpu-experts", action="store_true",
                   help="let the cost model run misses, or part of one while the rest is copied, on host cores "
                        "(the engine's default beside a GPU)")
    s.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    c = sub.add_parser("predictors", help="precision/recall of lookahead, exact and learned predictors",
                       description="How well each routing predictor foresees the experts of later MoE layers on "
                                   "held-out corpus text: precision and recall of lookahead (the next layer's "
                                   "router on the current hidden state), exact (pre-attention routing) and, with "
                                   "--trace, the learned predictor fitted on that trace.")
    c.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    c.add_argument("--trace", default=None, help="trace to train the learned predictor on")
    c.add_argument("--depth", type=int, default=1, help="predict this many MoE layers ahead")
    c.add_argument("--batches", type=int, default=2, help="held-out corpus batches to evaluate on")
    c.add_argument("--seq-len", type=int, default=64, help="sequence length of the held-out batches")
    c.add_argument("--data", default=None, help="corpus for the held-out batches (default: the standard library)")
    c.add_argument("--json", default=None, metavar="PATH", help="write the comparison as JSON")


POLICY_HELP = {
    "lru": "least recently used (the engine's)",
    "lfu": "least frequently used (the engine's)",
    "default": "the engine's default: the first half of the trace (the calibration window) runs predictive, "
               "then the fastest of predictive, every peer, LRU and LFU on that window serves the rest",
    "predictive": "the adaptive planner: cost-model prefetch, eviction by expected next use; predictions from "
                  "the recorded lookahead column, else the learned predictor fitted on this trace (in-sample)",
    "fiddler": "Fiddler: a miss runs on the host cores unless copy + device run is faster; copies in 1/8 of the "
               "slots",
    "llama-cpp-n-cpu-moe": "llama.cpp --n-cpu-moe N: the experts of the first N layers on the host, the rest "
                           "in slots; static, N as small as the slots allow",
    "ktransformers": "KTransformers: the hottest experts (profile) pinned in slots, every other on the host "
                     "cores; nothing copied while decoding",
    "hybrid": "the ktransformers hot set; each cold expert on the host or over the link, whichever ends first "
              "(copies in 1/8 of the slots, LRU)",
    "hybrid-lru": "hybrid with half the slots an LRU area for copies",
    "oracle": "predictive given exact predictions of the next --depth layers (a perfect predictor)",
    "belady": "evicts the expert used farthest in the future, no prefetch: the offline optimum of demand paging",
    "belady-prefetch": "belady with exact predictions and the cost model's prefetch",
    "this-token-lru": "belady within the current forward pass only, LRU beyond it",
    "this-token-lfu": "belady within the current forward pass only, LFU beyond it",
    "mixtral-offloading": "LRU inside equal per-layer budgets, next-layer prefetch from the learned predictor "
                          "(standing in for its speculative gate)",
    "moe-infinity": "evicts the lowest activation frequency, the farthest layer first",
}
"""One line per simulator policy for `moe trace simulate --help` (a test holds it to SIM_POLICIES)."""


def policy_help(width: int = 100) -> str:
    import textwrap
    return "\n".join(textwrap.fill(POLICY_HELP.get(name, "(undocumented)"), width, initial_indent=f"  {name:<19} ",
                                   subsequent_indent=" " * 22) for name in SIM_POLICIES)


def _record(args: argparse.Namespace) -> int:
    from moe_runtime.core.data import load_corpus
    from moe_runtime.core.train import load_model
    from moe_runtime.offload.engine import ExpertCacheEngine
    from moe_runtime.offload.generate_cli import prompt_tensor

    model, run, _ = load_model(args.checkpoint, device="cpu")
    total = model.cfg.num_moe_layers * model.cfg.moe.num_experts
    engine = ExpertCacheEngine(model, gpu_expert_slots=total, policy="lru", device=args.device, record_trace=True)
    if args.corpus_batches > 0:
        corpus = load_corpus(args.data, vocab_size=model.cfg.vocab_size)
        for i in range(args.corpus_batches):
            x, _ = corpus.batch("val", i, args.batch, min(args.seq_len, model.cfg.max_seq_len), seed=args.seed)
            engine.forward(x)
    else:
        args.prompt_ids = None
        prompt = prompt_tensor(args, model.cfg.vocab_size)
        room = model.cfg.max_seq_len - prompt.shape[1]
        new = room if args.max_new_tokens is None else args.max_new_tokens
        if not 1 <= new <= room:
            raise ValueError(f"--max-new-tokens={new}: the prompt ({prompt.shape[1]} tokens) leaves room for 1 to "
                             f"{room} new tokens within max_seq_len={model.cfg.max_seq_len}")
        gen = torch.Generator(device=engine.device).manual_seed(args.seed)
        engine.generate(prompt, new, temperature=args.temperature, generator=gen)
    trace = engine.trace()
    trace.meta["run"] = run.name
    path = trace.save(args.out)
    print(f"routing trace: {path} ({len(trace)} records, {trace.num_layers} MoE layers x {trace.num_experts} "
          f"experts, top-{trace.top_k}, {path.stat().st_size} bytes)")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from moe_runtime.offload.projection import constants, project, projection_calibration
    from moe_runtime.offload.simulate import format_table, parse_capacities, simulate_grid, trace_timing
    from moe_runtime.offload.trace import RoutingTrace

    trace = RoutingTrace.load(args.trace)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in SIM_POLICIES]
    if bad:
        raise ValueError(f"--policies {bad} not in {', '.join(SIM_POLICIES)}")
    if (args.model_shape is None) != (args.link is None):
        raise ValueError("give --model-shape and --link together (a projection needs both), or neither")
    if (args.expert_dtype or args.expert_group is not None or args.host_ratios) and not args.model_shape:
        raise ValueError("--expert-dtype/--expert-group/--host-ratios project onto a real shape: add --model-shape "
                         "and --link (a recorded calibration was measured in its own format)")
    caps = parse_capacities(args.capacities, trace.num_layers * trace.num_experts)
    if args.model_shape and any(x is not None for x in (args.copy_ms, args.attn_ms, args.expert_ms)):
        raise ValueError("--copy-ms/--attn-ms/--expert-ms override a recorded calibration; a projection "
                         "takes its constants from --model-shape and --link")
    if args.expert_dtype:
        return _simulate_formats(args, trace, policies, caps)
    cal = projection_calibration(args.model_shape, args.link) if args.model_shape else \
        trace_timing(trace, args.copy_ms, args.attn_ms, args.expert_ms)
    rows = simulate_grid(trace, policies, caps, cal, depth=args.depth, cpu_experts=args.cpu_experts)
    print(f"trace {args.trace}: {len(trace)} records, {trace.num_layers} layers x {trace.num_experts} experts; "
          f"copy {cal.copy_s * 1e3:.3f} ms/expert, attention {cal.attn_s * 1e3:.3f} ms/layer")
    consts = None
    if args.model_shape:
        consts = constants(args.model_shape, args.link)
        for k, v in consts.items():
            print(f"  {k}: {v}")
        for r in rows:
            r["projection"] = project(r, trace.num_layers, args.model_shape)
        print(format_projection(rows))
    else:
        print(format_table(rows))
    _write_json(args, {"trace": str(args.trace), "calibration": cal.to_dict(), "constants": consts, "rows": rows})
    return 0


def _write_json(args: argparse.Namespace, obj: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(obj, indent=2, default=list))


def _simulate_formats(args: argparse.Namespace, trace, policies: list[str], caps: list[int]) -> int:
    """One projection per expert format at equal slot memory: --capacities name bf16 experts' GiB."""
    from moe_runtime.offload.projection import (equal_gib_slots, format_calibration, format_constants,
                                                 parse_formats, project)
    from moe_runtime.offload.simulate import simulate_grid

    fmts = parse_formats(args.expert_dtype, args.expert_group)
    total = trace.num_layers * trace.num_experts
    print(f"trace {args.trace}: {len(trace)} records, {trace.num_layers} layers x {trace.num_experts} experts; "
          f"experts projected onto {args.model_shape} on {args.link} in {', '.join(f.label for f in fmts)}")
    rows, consts, cals = [], {}, {}
    for f in fmts:
        c = consts[f.label] = format_constants(args.model_shape, args.link, f, host_ratios=args.host_ratios)
        cal = format_calibration(args.model_shape, args.link, f, host_ratios=args.host_ratios)
        cals[f.label] = cal.to_dict()
        fewer = f" ({c['bytes_vs_bf16']:.2f}x fewer bytes than bf16)" if f.dtype != "bf16" else ""
        print(f"{f.label}: {c['expert_mb']:.1f} MB per expert{fewer}, "
              f"host RAM for all experts {c['host_ram_gib']:.1f} GiB (bf16 {c['bf16_host_ram_gib']:.1f}); copy "
              f"{c['copy_ms']:.3f} ms, host run {c['host_ms_1_token']:.3f} ms, device run {c['expert_ms_1_token']:.3f} ms"
              f"\n  host: {c['host_source']}\n  device: {c['expert_source']}")
        for cap in caps:
            slots = equal_gib_slots(cap, total, c["expert_bytes"], c["bf16_expert_bytes"])
            if f.dtype != "bf16":
                print(f"  the slot memory of {cap} bf16 experts ({cap / total:.0%}) holds {slots} {f.label} experts "
                      f"({slots / total:.0%})")
            for r in simulate_grid(trace, policies, [slots], cal, depth=args.depth, cpu_experts=args.cpu_experts):
                r.update(expert_format=f.label, bf16_slots=cap, host_ram_gib=c["host_ram_gib"],
                         projection=project(r, trace.num_layers, args.model_shape))
                rows.append(r)
    print(format_projection(rows))
    _write_json(args, {"trace": str(args.trace), "calibrations": cals, "constants": consts, "rows": rows})
    return 0


def format_projection(rows) -> str:
    """tokens/s and bytes/token lead; hit rate is a diagnostic. Rows of a format projection (expert_format)
    also show the format, the bf16 slots whose memory they use, and the host RAM of all experts."""
    fm = any("expert_format" in r for r in rows)
    pre = f"{'format':>8} {'bf16 slots':>10} " if fm else ""
    head = (f"{pre}{'policy':>18} {'slots':>6} {'tok/s':>8} {'MiB/token':>10} {'copies/tok':>10} {'stall ms/tok':>12} "
            f"{'hit rate':>9}" + (f" {'host RAM GiB':>12}" if fm else ""))
    lines = [head, "-" * len(head)]
    for r in rows:
        p = r["projection"]
        lead = f"{r['expert_format']:>8} {r['bf16_slots']:>10} " if fm else ""
        if p["tokens_per_s"] is None:
            lines.append(f"{lead}{r['policy']:>18} {r['capacity']:>6}  (no decode pass in the trace)")
            continue
        hr = "n/a" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        lines.append(f"{lead}{r['policy']:>18} {r['capacity']:>6} {p['tokens_per_s']:>8.2f} "
                     f"{p['bytes_per_token'] / 2**20:>10.1f} {p['copies_per_token']:>10.1f} "
                     f"{p['stall_ms_per_token']:>12.2f} {hr:>9}" + (f" {r['host_ram_gib']:>12.1f}" if fm else ""))
    return "\n".join(lines)


def _predictors(args: argparse.Namespace) -> int:
    from moe_runtime.core.data import load_corpus
    from moe_runtime.core.train import load_model
    from moe_runtime.offload.evaluate import evaluate_predictors, format_comparison
    from moe_runtime.offload.predictor import LearnedPredictor
    from moe_runtime.offload.trace import RoutingTrace

    model, _, _ = load_model(args.checkpoint, device="cpu")
    learned = LearnedPredictor.fit(RoutingTrace.load(args.trace), args.depth) if args.trace else None
    corpus = load_corpus(args.data, vocab_size=model.cfg.vocab_size)
    seq = min(args.seq_len, model.cfg.max_seq_len)
    x = torch.cat([corpus.batch("val", 10_000 + i, 4, seq)[0] for i in range(args.batches)])
    res = evaluate_predictors(model, x, depth=args.depth, learned=learned)
    print(format_comparison(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


def run_trace(args: argparse.Namespace) -> int:
    actions = {"record": _record, "simulate": _simulate, "predictors": _predictors}
    return actions[args.trace_command](args)


__all__ = ["register", "add_trace_args", "run_trace"]
