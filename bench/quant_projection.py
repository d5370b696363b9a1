"""Projected tokens/s and host RAM per expert format at equal slot memory (issue 20 item 3).

    python bench/quant_projection.py                  # bench/results/quant_projection.{json,md}
    python bench/quant_projection.py --shapes mixtral-8x7b --links h100-pcie5 --part /tmp/m.json   # one part
    python bench/quant_projection.py --merge /tmp/m.json,/tmp/q.json,/tmp/g.json   # parts -> results
    python bench/quant_projection.py --quick          # two traces per shape, bf16 and int4; prints only

For Mixtral-8x7B, Qwen3-30B-A3B and gpt-oss-120b on each link, every sealed trace of
bench/results/cache_traces (the trained-model and synthetic traces bench/cache_policies.py made) is
replayed by the engine's planner (offload/simulate.py) the way bench/cache_policies.py does: the first
half fits the predictor, profiles the peers' hot sets and is all the default planner's choice of plan
sees; every policy is judged on the second half (out of sample). Per expert format the calibration is
offload/projection.format_calibration: bytes per expert from kernels/quant.expert_bytes (copy over
the link, host RAM of all experts), the host time = the bf16 host constant x that format's measured
host-time ratio (bench/results/quant_quality.json's host rows), the device time by bytes (an
assumption: the fused-dequantisation kernel has not run on a GPU). Slots: the slot memory that holds
--cache of the experts in bf16, filled with as many experts of the format as fit (equal slot GiB).
Policies: the default (the plan chosen on the calibration half) and every host-using peer; the table
shows the default and the best peer beside it. These are projections from measured and stated
constants, not GPU measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache_policies as cp  # noqa: E402  (its trace names, predictor fit and split-run measurement)

from moe_runtime.offload.plan import PEERS  # noqa: E402
from moe_runtime.offload.projection import (SHAPES, SPLIT_GPU_S, ExpertFormat, equal_gib_slots,  # noqa: E402
                                            format_calibration, format_constants, project)
from moe_runtime.offload.report import cpu_model, utc_now  # noqa: E402
from moe_runtime.offload.simulate import choose_policy, profile_of, simulate, split_trace, steps_of  # noqa: E402
from moe_runtime.offload.trace import RoutingTrace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = (ExpertFormat("bf16"), ExpertFormat("int8"), ExpertFormat("int4", 64), ExpertFormat("int4", 128),
           ExpertFormat("mxfp4"))


def _order(label: str) -> tuple[int, float]:
    """Table order: FORMATS' order, then the device-slowdown sensitivity rows of a format by their factor."""
    base, _, slow = label.partition(" device x")
    names = [f.label for f in FORMATS]
    return (names.index(base) if base in names else len(names), float(slow or 1))


def sealed_traces(shape: str, quick: bool) -> dict[str, RoutingTrace]:
    """The shape's sealed traces from bench/results/cache_traces (cache_policies' names)."""
    paths = {n: cp._trace_path(shape, n) for n in cp.TRACE_NAMES}
    out = {n: RoutingTrace.load(p) for n, p in paths.items() if p.exists()}
    if not out:
        raise SystemExit(f"no traces for {shape} in {cp.TRACES}: run `python bench/cache_policies.py --record`")
    return dict(list(out.items())[:2]) if quick else out


def label(f: ExpertFormat, slow: float) -> str:
    return f.label if slow == 1.0 or f.dtype == "bf16" else f"{f.label} device x{slow:g}"


def project_trace(shape: str, name: str, trace: RoutingTrace, links: list[str], fmts, frac: float,
                  split_s: float, slow: float = 1.0) -> list[dict]:
    """Every format x link on one trace's held-out half: the default plan and every peer."""
    calib, held = split_trace(trace)
    steps = steps_of(held)
    profile = profile_of(steps_of(calib), trace.num_layers, trace.num_experts)
    predictor = "recorded" if trace.lookahead is not None else "learned"
    learned, memo, rows = cp.fit_learned(calib), {}, []
    total = trace.num_layers * trace.num_experts
    bf16_slots = max(1, round(frac * total))
    for link in links:
        for f in fmts:
            c = format_constants(shape, link, f, device_slowdown=slow)
            cal = format_calibration(shape, link, f, device_slowdown=slow)
            slots = equal_gib_slots(bf16_slots, total, c["expert_bytes"], c["bf16_expert_bytes"])
            t0 = time.perf_counter()
            choice, scores = choose_policy(calib, slots, cal, predictor=predictor, split_s=split_s, fit=cp.fit_learned)
            tps = {}
            for policy in ("default", *PEERS):
                plan = choice if policy == "default" else policy
                sim, cpu = cp.HOST_CORES.get(plan, (plan, False))
                r = simulate(held, sim, slots, cal, learned=learned, steps=steps, cpu_experts=cpu, profile=profile,
                             memo=memo, predictor=predictor if sim == "predictive" else "learned", split_s=split_s)
                p = project(r, trace.num_layers, shape)
                tps[policy] = p["tokens_per_s"]
                rows.append({"shape": shape, "link": link, "trace": name, "format": label(f, slow), "policy": policy,
                             "bf16_slots": bf16_slots, "slots": slots, "total_experts": total,
                             "host_ram_gib": c["host_ram_gib"], "hit_rate": r["hit_rate"], **p,
                             "cpu_served": r["cpu_served"],
                             **({"chosen": choice, "calibration_tok_s": scores} if policy == "default" else {})})
            print(f"  {shape} {link} {name} {label(f, slow)} ({slots}/{total} slots, {time.perf_counter() - t0:.0f} s): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in tps.items()), flush=True)
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """Per (shape, link, trace, format): the default, the best peer, and both against bf16's default."""
    out = []
    keys = sorted({(r["shape"], r["link"], r["trace"], r["format"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], _order(k[3])))
    for k in keys:
        sel = {r["policy"]: r for r in rows if (r["shape"], r["link"], r["trace"], r["format"]) == k}
        base = next(r for r in rows if (r["shape"], r["link"], r["trace"], r["format"], r["policy"])
                    == (*k[:3], "bf16", "default"))
        best = max(PEERS, key=lambda p: sel[p]["tokens_per_s"] or 0.0)
        d = sel["default"]
        out.append({"shape": k[0], "link": k[1], "trace": k[2], "format": k[3], "slots": d["slots"],
                    "bf16_slots": d["bf16_slots"], "total_experts": d["total_experts"], "host_ram_gib": d["host_ram_gib"],
                    "default": d["tokens_per_s"], "chosen": d["chosen"], "best_peer": best,
                    "best_peer_tps": sel[best]["tokens_per_s"], "default_vs_bf16": d["tokens_per_s"] / base["tokens_per_s"]})
    return out


def summary(tg: list[dict]) -> list[dict]:
    """Per (shape, link, format): min / median of default tok/s vs bf16's default over the traces."""
    out = []
    for k in sorted({(t["shape"], t["link"], t["format"]) for t in tg}, key=lambda k: (k[0], k[1], _order(k[2]))):
        sel = [t for t in tg if (t["shape"], t["link"], t["format"]) == k]
        v = [t["default_vs_bf16"] for t in sel]
        out.append({"shape": k[0], "link": k[1], "format": k[2], "traces": len(v), "host_ram_gib": sel[0]["host_ram_gib"],
                    "median_default_tps": statistics.median(t["default"] for t in sel), "min_vs_bf16": min(v),
                    "median_vs_bf16": statistics.median(v), "max_vs_bf16": max(v), "at_least_3x": sum(x >= 3 for x in v)})
    return out


def markdown(out: dict) -> str:
    lines = [f"# Projected tokens/s and host RAM per expert format at equal slot memory ({out['date']})", "",
             f"Projections (not GPU measurements; the simulation is deterministic given its constants, only the "
             f"split run's CPU-side cost is measured on the machine) made on {out['host']}; slot memory = the memory that holds "
             f"{out['cache']:.0%} of the experts in bf16, filled with as many experts of each format as fit. Each "
             "trace's first half fits the predictor and profiles the hot sets; the default planner chooses its plan "
             "on it; every policy is judged on the second half. Command: `python bench/quant_projection.py`.", "",
             "Host time per format: the bf16 constant (8.3 ms per 352 MB Mixtral expert at one token, 16 host cores "
             "beside an H100, measured November 2026) x the format's measured host-time ratio vs bf16: "
             + ", ".join(f"{f} x {r:.2f}" for f, r in out["host_ratios"].items())
             + f" (`bench/results/quant_quality.json` host rows, measured {out['host_ratios_date']} on "
             f"{out['host_ratios_machine']}; assumed to carry over to the H100 machine's cores). Device time per "
             f"quantised format: {out['device_assumption']}. Rows `device xN`: a sensitivity, that device time "
             "times N.", "",
             "## Default tok/s vs bf16 at equal slot memory, per shape, link and format (over the traces)", "",
             "| shape | link | format | host RAM GiB | slots of the shape at equal GiB | traces | median default tok/s "
             "| min vs bf16 | median | max | traces >= 3x |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in out["summary"]:
        c = out["constants"][f"{s['shape']}/{s['link']}/{s['format']}"]
        lines.append(f"| {s['shape']} | {s['link']} | {s['format']} | {s['host_ram_gib']:.1f} | {c['equal_gib_slots']} of "
                     f"{SHAPES[s['shape']].num_layers * SHAPES[s['shape']].num_experts} | {s['traces']} | "
                     f"{s['median_default_tps']:.2f} | {s['min_vs_bf16']:.2f}x | "
                     f"{s['median_vs_bf16']:.2f}x | {s['max_vs_bf16']:.2f}x | {s['at_least_3x']} |")
    lines += ["", "## Every case", "",
              "| shape | link | trace | format | slots (bf16 slots) | host RAM GiB | default tok/s | chosen | best peer "
              "| its tok/s | default / bf16 default |", "|---|---|---|---|---:|---:|---:|---|---|---:|---:|"]
    for t in out["targets"]:
        lines.append(f"| {t['shape']} | {t['link']} | {t['trace']} | {t['format']} | {t['slots']} of "
                     f"{t['total_experts']} ({t['bf16_slots']}) | {t['host_ram_gib']:.1f} | {t['default']:.2f} | "
                     f"{t['chosen']} | {t['best_peer']} | {t['best_peer_tps']:.2f} | {t['default_vs_bf16']:.2f}x |")
    lines += ["", "## Constants per shape, link and format", "",
              "| shape / link / format | bytes per expert | vs bf16 | host RAM GiB | copy ms | host ms (1 token) | "
              "device ms (1 token) | slots of the shape at equal GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, c in out["constants"].items():
        lines.append(f"| {k} | {c['expert_bytes']:,} | {c['bytes_vs_bf16']:.2f}x | {c['host_ram_gib']:.1f} | "
                     f"{c['copy_ms']:.3f} | {c['host_ms_1_token']:.3f} | {c['expert_ms_1_token']:.3f} | "
                     f"{c['equal_gib_slots']} of {SHAPES[k.split('/')[0]].num_layers * SHAPES[k.split('/')[0]].num_experts} |")
    return "\n".join(lines) + "\n"


def finish(out: dict, write: bool) -> None:
    out["targets"] = targets(out["rows"])
    out["summary"] = summary(out["targets"])
    md = markdown(out)
    print(md)
    if write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "quant_projection.json").write_text(json.dumps(out, indent=2))
        (RESULTS / "quant_projection.md").write_text(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="mixtral-8x7b,qwen3-30b-a3b,gpt-oss-120b")
    p.add_argument("--links", default="h100-pcie5")
    p.add_argument("--cache", type=float, default=0.25, help="slot memory: this share of all experts in bf16")
    p.add_argument("--quick", action="store_true", help="two traces per shape, bf16 and int4; prints, writes nothing")
    p.add_argument("--formats", default=",".join(f.label for f in FORMATS),
                   help="expert formats, comma-separated labels (bf16, int8, int4/G, mxfp4)")
    p.add_argument("--device-slowdown", type=float, default=1.0,
                   help="sensitivity: quantised experts' device time x this (the fused kernel is not measured)")
    p.add_argument("--part", help="write this run's JSON here (a part for --merge)")
    p.add_argument("--merge", help="comma-separated --part files: one bench/results/quant_projection.{json,md}")
    args = p.parse_args(argv)
    if args.merge:
        outs = [json.loads(Path(f).read_text()) for f in args.merge.split(",") if f]
        out = {**outs[0], "date": max(o["date"] for o in outs), "shapes": [s for o in outs for s in o["shapes"]],
               "rows": [r for o in outs for r in o["rows"]], "wall_s": max(o["wall_s"] for o in outs),
               "constants": {k: v for o in outs for k, v in o["constants"].items()},
               "parts": [{"shapes": o["shapes"], "host": o["host"], "wall_s": o["wall_s"]} for o in outs]}
        out["host"] = "; ".join(f"{'+'.join(o['shapes'])}: {o['host']}, {o['wall_s'] / 60:.0f} min" for o in outs)
        finish(out, True)
        return 0
    torch.set_num_threads(1)
    t0, load = time.perf_counter(), os.getloadavg()
    shapes, links = [s for s in args.shapes.split(",") if s], [x for x in args.links.split(",") if x]
    fmts = [ExpertFormat(n.split("/")[0], int(n.split("/")[1]) if "/" in n else None)
            for n in args.formats.split(",") if n]
    fmts = [f for f in fmts if f.dtype in ("bf16", "int4")] if args.quick else fmts
    slow = args.device_slowdown
    split = cp.split_overhead(60 if args.quick else 400)
    split_s = split["cpu_overhead_s"] + SPLIT_GPU_S
    rows = []
    for shape in shapes:
        for name, trace in sealed_traces(shape, args.quick).items():
            rows += project_trace(shape, name, trace, links, fmts, args.cache, split_s, slow)
    hr = json.loads(Path(RESULTS / "quant_quality.json").read_text())
    out = {"date": utc_now(), "host": f"{cpu_model()} ({platform.machine()}, 1 torch thread; load average "
           f"{', '.join(f'{x:.1f}' for x in load)} at the start)",
           "shapes": shapes, "links": links, "cache": args.cache, "formats": [f.label for f in fmts],
           "host_ratios_date": hr.get("host_measured", hr).get("date"),
           "host_ratios_machine": hr.get("host_measured", hr).get("machine"),
           "host_ratios": {f.label: format_constants(shapes[0], links[0], f)["host_ratio_vs_bf16"] for f in FORMATS},
           "device_assumption": format_constants(shapes[0], links[0], FORMATS[2])["expert_source"],
           "split": {**split, "split_s": split_s},
           "constants": {f"{s}/{l}/{label(f, slow)}": format_constants(s, l, f, bf16_fraction=args.cache,
                                                                          device_slowdown=slow)
                         for s in shapes for l in links for f in fmts},
           "rows": rows, "wall_s": time.perf_counter() - t0}
    if args.part:
        Path(args.part).write_text(json.dumps(out, indent=2))
        return 0
    finish(out, not args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
