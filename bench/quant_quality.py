"""Quantised experts: quality per format, and the host expert path's speed per format.

    python bench/quant_quality.py                      # writes bench/results/quant_quality.{json,md}
    python bench/quant_quality.py --steps 60 --host-d 256 --host-f 704   # a quick look
    python bench/quant_quality.py --host-only          # only the host rows, into the existing results

Quality: a tiny model trained here (the `tiny` preset on the stdlib corpus, --steps steps, in a
temp dir) and a random-weight HF Mixtral (transformers, saved and loaded through core/hf). For each
expert format the experts are quantised and dequantised (offload/quant_host.quantize_dequantize_banks:
exactly what the expert cache computes with, see tests/test_quant_engine.py) and compared with the
float model on held-out windows: mean token NLL (and its relative increase), mean KL(float || quantised)
of the next-token distributions, top-1 agreement (teacher forced) and free-running greedy agreement
(the fraction of N greedy tokens equal to the float model's). The float baseline is the model's own
dtype (fp32 here), written "float".
Host path: one expert (D=--host-d, F=--host-f) run on host cores at N in --host-tokens token rows from
its store bytes, per format the path the engine runs (bf16: offload/cpu_experts.host_expert_forward;
int8 / int4 / mxfp4: offload/quant_host.host_quant_expert_forward, the C kernels where built) and at
N=1 the torch paths too; rounds interleaved, median per row, speed vs the engine's bf16 path in the
same rounds; effective GB/s = the expert's bytes / time. --host-only re-measures just these rows into
the existing results.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_runtime.core.config import get_preset  # noqa: E402
from moe_runtime.core.train import Trainer  # noqa: E402
from moe_runtime.kernels import quant as kq  # noqa: E402
from moe_runtime.offload.cpu_experts import expert_forward, host_expert_forward, host_path  # noqa: E402
from moe_runtime.offload.quant_host import host_quant_expert_forward, host_quant_path, quantize_dequantize_banks  # noqa: E402
from moe_runtime.offload.report import cpu_model, utc_now  # noqa: E402

FORMATS = [("int8", None), ("int4", 64), ("int4", 128), ("mxfp4", None)]


@torch.no_grad()
def _logits(model, x_BS: torch.Tensor) -> torch.Tensor:
    return model(x_BS).logits.float()


@torch.no_grad()
def _greedy(model, prompt_BS: torch.Tensor, n: int) -> torch.Tensor:
    return model.generate(prompt_BS, n)[:, -n:]  # the n new tokens


def quality(model, x_BS: torch.Tensor, y_BS: torch.Tensor, prompts_BS: torch.Tensor, n_gen: int) -> list[dict]:
    """Per format: NLL, KL, agreement against the float model."""
    ref_logits = _logits(model, x_BS)
    ref_nll = float(F.cross_entropy(ref_logits.flatten(0, 1), y_BS.flatten()))
    ref_logp = ref_logits.log_softmax(-1)
    ref_gen = _greedy(model, prompts_BS, n_gen)
    rows = [{"format": "float", "group": None, "mean_nll": ref_nll, "nll_increase_pct": 0.0, "kl": 0.0,
             "top1_agreement": 1.0, "greedy_agreement": 1.0}]
    for fmt, group in FORMATS:
        q = copy.deepcopy(model)
        quantize_dequantize_banks(q, fmt, group)
        lg = _logits(q, x_BS)
        nll = float(F.cross_entropy(lg.flatten(0, 1), y_BS.flatten()))
        logp = lg.log_softmax(-1)
        kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
        top1 = float((lg.argmax(-1) == ref_logits.argmax(-1)).float().mean())
        gen = _greedy(q, prompts_BS, n_gen)
        rows.append({"format": fmt, "group": kq.check_format(fmt, group), "mean_nll": nll,
                     "nll_increase_pct": 100 * (nll - ref_nll) / ref_nll, "kl": kl, "top1_agreement": top1,
                     "greedy_agreement": float((gen == ref_gen).float().mean())})
    return rows


def tiny_model(steps: int, seq: int, windows: int):
    run = get_preset("tiny")
    run.train.device = "cpu"
    run.train.max_steps = steps
    run.train.eval_interval = steps
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(run, out_dir=tmp, progress=False, plots=False)
        summary = trainer.fit(resume=False)
    x, y = trainer.corpus.batch("val", 0, windows, seq, seed=1234)
    return trainer.model.eval().cpu(), x, y, summary["last_eval"]["val_loss"]


def hf_mixtral(seq: int, windows: int):
    import transformers
    from moe_runtime.core.hf import load_hf
    cfg = transformers.MixtralConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=256, initializer_range=0.02,
                                     bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _, _ = load_hf(tmp, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    # a random model has no "text": random token windows; NLL is near log(V), KL / agreement are the signal
    toks = torch.randint(0, cfg.vocab_size, (windows, seq + 1), generator=g)
    return model.eval(), toks[:, :-1], toks[:, 1:], cfg


def _host_paths(D: int, Fh: int, n: int) -> dict:
    """{row name: (fn, expert bytes, format, path)} for one expert at n token rows: what the engine runs
    on the host per format (offload/cpu_experts.host_expert_forward for bf16, quant_host for the rest:
    the C kernels where built), and at n == 1 the torch paths as well (the bf16 expert through torch's
    matmul, the quantised ones through quant_host's torch fallback)."""
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(1, D, 2 * Fh, generator=g) / D ** 0.5
    w2 = torch.randn(1, Fh, D, generator=g) / Fh ** 0.5
    x = torch.randn(n, D, generator=g).bfloat16()
    cnt = torch.tensor([n])
    w13b, w2b = w13[0].bfloat16().contiguous(), w2[0].bfloat16().contiguous()
    nb = kq.expert_bytes(D, Fh, "bf16")
    paths = {"bf16": (lambda: host_expert_forward(x, w13b, w2b, cnt), nb, "bf16", host_path(torch.bfloat16))}
    if n == 1:
        paths["bf16-torch"] = (lambda: expert_forward(x, w13b, w2b, cnt), nb, "bf16", "torch matmul")
    for fmt, group in (("int8", None), ("int4", 64), ("mxfp4", None)):
        qe = kq.quantize_experts(w13, w2, fmt, group)
        nb = kq.expert_bytes(D, Fh, fmt, group)
        paths[fmt] = ((lambda qe=qe: host_quant_expert_forward(x, qe[0])), nb, fmt, host_quant_path(fmt))
        if n == 1:
            paths[f"{fmt}-torch"] = ((lambda qe=qe: host_quant_expert_forward(x, qe[0], impl="torch")), nb, fmt,
                                     "torch fallback (MOE_HOST_KERNEL=torch)")
    return paths


def host_speed(D: int, Fh: int, rounds: int, threads: int, n: int = 1) -> list[dict]:
    """Median seconds per expert at n token rows per path, rounds interleaved (one round runs every
    path once, in turn); speed vs the engine's bf16 host path in the same rounds."""
    torch.set_num_threads(threads)
    paths = _host_paths(D, Fh, n)
    times = {k: [] for k in paths}
    cpu = {k: [] for k in paths}
    for fn, *_ in paths.values():
        fn()  # warm-up (and builds the C kernels)
    for _ in range(rounds):
        for k, (fn, *_) in paths.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[k].append(time.thread_time() - c0)
            times[k].append(time.perf_counter() - t0)
    base, cbase = statistics.median(times["bf16"]), statistics.median(cpu["bf16"])
    out = []
    for k, (_, nbytes, fmt, path) in paths.items():
        med, cmed = statistics.median(times[k]), statistics.median(cpu[k])
        # CPU time of the calling thread: with one thread every path computes there, and it is what the
        # other processes on a shared machine do not inflate (wall time includes their time slices)
        one = threads == 1
        out.append({"format": k, "expert_bytes": nbytes, "median_s": med, "gbps": nbytes / med / 1e9,
                    "speedup_vs_bf16": base / med, "rounds": rounds, "n_tokens": n, "base_format": fmt,
                    "path": path, "cpu_median_s": cmed if one else None,
                    "cpu_speedup_vs_bf16": cbase / cmed if one else None})
    return out


def host_section(args) -> dict:
    """The host rows of the results: N=1 (`host_expert_path`, rows keyed by "format") and every N in
    --host-tokens (`host_expert_path_by_tokens`), with the date, load average and machine they ran at."""
    load0 = os.getloadavg()
    by_n = {str(n): host_speed(args.host_d, args.host_f, args.rounds, args.threads, n) for n in args.host_tokens}
    ones = by_n.get("1") or host_speed(args.host_d, args.host_f, args.rounds, args.threads, 1)
    return {"host_expert_path": ones, "host_expert_path_by_tokens": by_n,
            "host_speed_vs_bf16": {r["format"]: r["speedup_vs_bf16"] for r in ones},
            "host_cpu_speed_vs_bf16": {r["format"]: r["cpu_speedup_vs_bf16"] for r in ones},
            "host_measured": {"date": utc_now(), "load_avg_1m_before_after": [load0[0], os.getloadavg()[0]],
                              "machine": _machine(), "D": args.host_d, "F": args.host_f, "rounds": args.rounds,
                              "threads": args.threads}}


def _cores() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


SHAPES = {"Mixtral-8x7B": (4096, 14336, 32, 8), "Qwen3-30B-A3B": (2048, 768, 48, 128),
          "gpt-oss-120b": (2880, 2880, 36, 128)}
"""(D, F, MoE layers, experts) of the shapes in the issue (routed experts only; gpt-oss' biases left out)."""


def bytes_table() -> list[dict]:
    """Bytes per expert and host RAM of all routed experts per format (kernels/quant.expert_bytes), and how
    many experts the slot memory of 25% of the experts in bf16 holds in each format."""
    rows = []
    for name, (D, Fh, L, E) in SHAPES.items():
        b16 = kq.expert_bytes(D, Fh, "bf16")
        slot_bytes = 0.25 * L * E * b16
        for fmt, group in [("bf16", None)] + FORMATS:
            b = kq.expert_bytes(D, Fh, fmt, group)
            rows.append({"model": name, "format": fmt, "group": group, "expert_bytes": b, "ratio_vs_bf16": b16 / b,
                         "host_gib": L * E * b / 2**30, "experts_in_25pct_bf16_slot_memory": int(slot_bytes // b),
                         "total_experts": L * E})
    return rows


def _table(rows: list[dict]) -> str:
    s = ("| format | group | mean NLL | NLL increase | KL(float‖q) | top-1 agreement | greedy agreement |\n"
         "|---|---:|---:|---:|---:|---:|---:|\n")
    for r in rows:
        s += (f"| {r['format']} | {r['group'] if r['group'] is not None else ''} | {r['mean_nll']:.4f} | "
              f"{r['nll_increase_pct']:+.2f}% | {r['kl']:.2e} | {r['top1_agreement']:.4f} | {r['greedy_agreement']:.4f} |\n")
    return s


def _machine() -> str:
    return f"{cpu_model()} ({torch.get_num_threads()} torch threads of {_cores()} cores, shared)"


def _host_md(res: dict) -> str:
    h = res["host_measured"]
    s = (f"\n**Host expert path** (one expert D={h['D']}, F={h['F']}, bf16 rows, {h['rounds']} interleaved rounds, "
         f"median; measured {h['date']} on {h['machine']}, load average "
         f"{h['load_avg_1m_before_after'][0]:.2f} before / {h['load_avg_1m_before_after'][1]:.2f} after; every row "
         "reads the same expert each round, so it is served from cache where it fits (L2 / L3), not from DRAM). "
         "The unsuffixed rows are what the engine runs on the host; `-torch` rows are the torch paths (no C "
         "compiler or MOE_HOST_KERNEL=torch); speed vs the engine's bf16 path in the same rounds; CPU time: the "
         "calling thread's (one thread: all the work), which other processes' time slices do not inflate:\n\n"
         "| N | format | path | expert bytes | time per expert | effective GB/s | speed vs bf16 | CPU time | "
         "CPU speed vs bf16 |\n|---:|---|---|---:|---:|---:|---:|---:|---:|\n")
    for n, rows in res["host_expert_path_by_tokens"].items():
        s += "".join(f"| {n} | {r['format']} | {r['path']} | {r['expert_bytes']:,} | {r['median_s'] * 1e3:.2f} ms | "
                     f"{r['gbps']:.2f} | {r['speedup_vs_bf16']:.2f}x | " + (
                         f"{r['cpu_median_s'] * 1e3:.2f} ms | {r['cpu_speedup_vs_bf16']:.2f}x |\n"
                         if r.get("cpu_median_s") else "| |\n") for r in rows)
    return s


def _markdown(res: dict) -> str:
    a = res["args"]
    hcfg = res["hf_mixtral_random"]["config"]
    return (f"Quantised experts, measured {res['date']} on {res['machine']}, torch {res['torch']} "
            f"(a shared machine: timings are noisy; ratios come from interleaved rounds).\n\n"
            f"**Tiny model** (`tiny` preset, {a['steps']} steps on the stdlib corpus, val loss "
            f"{res['tiny']['val_loss_at_end_of_training']:.4f}); {a['windows']} held-out windows x {a['seq']} bytes; "
            f"greedy agreement over 8 prompts x {a['gen']} tokens.\n\n" + _table(res["tiny"]["rows"]) +
            f"\n**Random HF Mixtral** (transformers MixtralForCausalLM, D={hcfg['hidden_size']}, "
            f"F={hcfg['intermediate_size']}, {hcfg['num_hidden_layers']} layers, {hcfg['num_local_experts']} experts, "
            "random weights, random token windows: NLL is ~log V, KL and agreement are the signal).\n\n"
            + _table(res["hf_mixtral_random"]["rows"]) + _host_md(res)
            + "\n**Bytes per expert and host RAM per format** (computed by kernels/quant.expert_bytes, not measured; "
            "slot column: experts that fit in the device memory that holds 25% of the experts in bf16):\n\n"
            "| model | format | bytes / expert | vs bf16 | host RAM, all experts | experts in 25%-of-bf16 slot memory |\n"
            "|---|---|---:|---:|---:|---:|\n"
            + "".join(f"| {r['model']} | {r['format']}{'/' + str(r['group']) if r['group'] else ''} | "
                      f"{r['expert_bytes']:,} | {r['ratio_vs_bf16']:.2f}x | {r['host_gib']:.1f} GiB | "
                      f"{r['experts_in_25pct_bf16_slot_memory']} of {r['total_experts']} |\n"
                      for r in res["bytes_per_format"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--steps", type=int, default=300, help="training steps of the tiny model")
    ap.add_argument("--seq", type=int, default=128, help="bytes per held-out window")
    ap.add_argument("--windows", type=int, default=32, help="held-out windows scored")
    ap.add_argument("--gen", type=int, default=64, help="free-running greedy tokens per prompt (8 prompts)")
    ap.add_argument("--host-d", type=int, default=1024, help="model dim D of the host-path expert")
    ap.add_argument("--host-f", type=int, default=2816, help="hidden dim F of the host-path expert")
    ap.add_argument("--host-tokens", type=int, nargs="+", default=[1, 8, 16], help="token rows N of the host rows")
    ap.add_argument("--host-only", action="store_true",
                    help="re-measure only the host rows and rewrite them into the existing results")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds of the host rows")
    ap.add_argument("--threads", type=int, default=1, help="torch (and host kernel) threads")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="results folder")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.host_only:
        res = json.loads((out / "quant_quality.json").read_text())
        res.update(host_section(args))
        res["args"].update({k: getattr(args, k) for k in ("host_d", "host_f", "host_tokens", "rounds", "threads")})
    else:
        tiny, x, y, val_loss = tiny_model(args.steps, args.seq, args.windows)
        tiny_rows = quality(tiny, x, y, x[:8, :16], args.gen)
        hf, hx, hy, hcfg = hf_mixtral(args.seq, args.windows)
        hf_rows = quality(hf, hx, hy, hx[:8, :16], args.gen)
        res = {"date": utc_now(), "machine": _machine(), "torch": torch.__version__, "args": vars(args),
               "tiny": {"steps": args.steps, "val_loss_at_end_of_training": val_loss, "rows": tiny_rows},
               "hf_mixtral_random": {"config": {k: getattr(hcfg, k) for k in (
                   "hidden_size", "intermediate_size", "num_hidden_layers", "num_local_experts", "vocab_size")},
                   "rows": hf_rows},
               **host_section(args), "bytes_per_format": bytes_table()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_quality.json").write_text(json.dumps(res, indent=2))
    md = _markdown(res)
    (out / "quant_quality.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
