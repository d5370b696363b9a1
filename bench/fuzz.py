"""Fuzz every file format the runtime reads: seeded mutations of a real checkpoint, routing trace
and configs, each loaded and classified (the generator of tests/fuzzing.py, larger).

    python bench/fuzz.py --cases 2000          # writes bench/results/fuzz.{json,md}
    python bench/fuzz.py --cases 200 --bomb-mb 4 --out /tmp/fuzz   # quick look

Targets (issue #12): 0 silent wrong loads, 0 exceptions outside the project's error types, 0 hangs,
peak RSS growth within 4 x the mutated file's size + 200 MB. Exit code 1 if any case fails.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.fuzzing import FAILURES, HANG_S, cases, make_seeds, run_case  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bomb-mb", type=float, default=24.0, help="largest msgpack bomb, in MiB")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="directory for fuzz.json/.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        seeds = make_seeds(Path(tmp) / "seeds")
        t0 = time.perf_counter()
        results = [run_case(seeds, *c, Path(tmp), bomb_mb=args.bomb_mb) for c in cases(args.cases, args.seed)]
        wall = time.perf_counter() - t0
    summary = summarise(results, args, wall)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps({"summary": summary, "cases": results}, indent=1))
    (out / "fuzz.md").write_text(markdown(summary))
    print(markdown(summary))
    return 1 if summary["failures"] else 0


def summarise(results: list[dict], args: argparse.Namespace, wall: float) -> dict:
    table = collections.defaultdict(collections.Counter)
    for r in results:
        table[f"{r['target']}/{r['kind']}"][r["outcome"]] += 1
    worst = max(results, key=lambda r: r["peak_growth_bytes"] - 4 * r["file_bytes"])
    return {"date": dt.date.today().isoformat(), "device": f"CPU {_cpu_name()}, 1 torch thread", "torch": torch.__version__, "python": platform.python_version(), "cases": len(results),
            "seed": args.seed, "bomb_mb": args.bomb_mb, "wall_s": round(wall, 1), "hang_limit_s": HANG_S,
            "failures": sum(r["outcome"] in FAILURES for r in results),
            "outcomes": dict(collections.Counter(r["outcome"] for r in results)),
            "by_class": {k: dict(v) for k, v in sorted(table.items())},
            "max_case_s": max(r["seconds"] for r in results),
            "max_file_mb": round(max(r["file_bytes"] for r in results) / 2**20, 2),
            "max_peak_growth_mb": round(max(r["peak_growth_bytes"] for r in results) / 2**20, 1),
            "worst_memory_case": {k: worst[k] for k in ("target", "kind", "detail", "file_bytes", "peak_growth_bytes")}}


def _cpu_name() -> str:
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                 if l.startswith("model name")]
        return f"{names[0]} ({len(names)} cores)" if names else platform.machine()
    except OSError:
        return platform.machine()


def markdown(s: dict) -> str:
    cols = ["refused", "identical", "valid", *FAILURES]
    lines = [f"`python bench/fuzz.py --cases {s['cases']} --seed {s['seed']} --bomb-mb {s['bomb_mb']:g}` on "
             f"{s['device']}, torch {s['torch']}, {s['date']}: {s['cases']} cases in {s['wall_s']} s, "
             f"**{s['failures']} failures**; slowest case {s['max_case_s']:.2f} s (hang limit {s['hang_limit_s']} s); "
             f"largest mutated file {s['max_file_mb']} MiB, largest peak RSS growth {s['max_peak_growth_mb']} MiB "
             f"(bound: 4 x file + 200 MiB).", "",
             "| target / mutation | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, c in s["by_class"].items():
        lines.append(f"| {name} | " + " | ".join(str(c.get(k, 0)) for k in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
