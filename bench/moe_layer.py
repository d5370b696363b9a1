"""MoE layer throughput: our MoELayer vs Hugging Face transformers' Mixtral sparse MoE block.

    python bench/moe_layer.py                      # CPU sizes (scaled-down shapes), writes bench/results/moe_layer_cpu.{json,md}
    python bench/moe_layer.py --device cuda        # real Mixtral / Qwen3-30B-A3B / OLMoE layer shapes, bf16
    python bench/moe_layer.py --quick              # one shape, two token counts: a smoke run

Both sides get identical weights (HF gate_up_proj [E, 2F, D] -> our w13 [E, D, 2F], down_proj
[E, D, F] -> w2 [E, F, D], router weight [E, D] as is), and the outputs are checked to agree
before anything is timed. HF runs with both experts implementations it ships, `eager` (a Python
loop over the experts that were hit) and `grouped_mm` (torch._grouped_mm). Timings are medians
of repeated runs after warm-up: CUDA events on the GPU, perf_counter on the CPU.
Needs the [hf] extra: pip install 'moe-runtime[hf]'.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_runtime.core.config import MoEConfig  # noqa: E402
from moe_runtime.core.layer import MoELayer  # noqa: E402

# name -> (E, K, D, F)
GPU_SHAPES = {"mixtral-8x7b": (8, 2, 4096, 14336), "qwen3-30b-a3b": (128, 8, 2048, 768),
              "olmoe-1b-7b": (64, 8, 2048, 1024)}
# The same expert counts and top-k, widths divided by 8 so a 2-core CPU finishes in minutes.
CPU_SHAPES = {"mixtral-8x7b/8": (8, 2, 512, 1792), "qwen3-30b-a3b/8": (128, 8, 256, 96),
              "olmoe-1b-7b/8": (64, 8, 256, 128)}
GPU_TOKENS = (1, 16, 512, 8192)
CPU_TOKENS = (1, 16, 512)


def hf_block(E: int, K: int, D: int, F: int, impl: str, device, dtype):
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError as e:
        raise SystemExit(f"bench/moe_layer.py needs transformers: pip install 'moe-runtime[hf]' ({e})")
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                        router_jitter_noise=0.0)
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(std=0.02)
    return block.to(device=device, dtype=dtype)


def ours_from_hf(block, E: int, K: int, D: int, F: int) -> MoELayer:
    layer = MoELayer(D, MoEConfig(num_experts=E, top_k=K, d_expert=F, norm_topk_prob=True))
    with torch.no_grad():
        layer.router.weight_ED.copy_(block.gate.weight)
        layer.experts.w13_EDF2.copy_(block.experts.gate_up_proj.transpose(1, 2))
        layer.experts.w2_EFD.copy_(block.experts.down_proj.transpose(1, 2))
    p = next(block.parameters())
    return layer.to(device=p.device, dtype=p.dtype)


def timer(device: torch.device, fn, warmup: int, reps: int) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_case(name, E, K, D, F, T, device, dtype, reps):
    torch.manual_seed(0)
    x = torch.randn(1, T, D, device=device, dtype=dtype)
    blocks = {impl: hf_block(E, K, D, F, impl, device, dtype) for impl in ("eager", "grouped_mm")}
    for b in blocks.values():  # identical weights everywhere
        b.load_state_dict(blocks["eager"].state_dict())
    ours = ours_from_hf(blocks["eager"], E, K, D, F)
    ref = blocks["eager"](x)
    y, _ = ours(x.view(T, D))
    with torch.no_grad():
        err = float((y.view_as(ref).float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    if not err < tol:
        raise SystemExit(f"{name} T={T}: our output differs from transformers' by rel. err {err:.2e} > {tol}")
    flops_fwd = 2 * T * K * 3 * D * F
    row = {"shape": name, "E": E, "K": K, "D": D, "F": F, "T": T, "rel_err_vs_hf": err}
    fns = {"ours": lambda xx: ours(xx.view(T, D))[0]}
    for impl, b in blocks.items():
        fns[f"hf_{impl}"] = (lambda bb: (lambda xx: bb(xx)))(b)
    warm = 2 if device.type == "cpu" else 5
    for label, fn in fns.items():
        try:
            with torch.no_grad():
                ms = timer(device, lambda: fn(x), warm, reps)
            xg = x.detach().clone().requires_grad_()
            ms_fb = timer(device, lambda: fn(xg).float().sum().backward(), warm, reps)
        except (RuntimeError, NotImplementedError) as e:
            row[f"{label}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            continue
        row[f"{label}_fwd_ms"] = ms
        row[f"{label}_fwdbwd_ms"] = ms_fb
        row[f"{label}_fwd_tflops"] = flops_fwd / ms / 1e9
        row[f"{label}_fwdbwd_tflops"] = 3 * flops_fwd / ms_fb / 1e9
    return row


def markdown(rows, meta) -> str:
    lines = [f"MoE layer, {meta['device_name']}, {meta['dtype']}, torch {meta['torch']}, transformers "
             f"{meta['transformers']}, {meta['date']}. Milliseconds (median); speed-up = HF time / our time.", "",
             "| shape | T | ours fwd | HF eager fwd | HF grouped_mm fwd | ours fwd+bwd | HF eager fwd+bwd | "
             "HF grouped_mm fwd+bwd | vs eager (fwd+bwd) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(r, k):
        return f"{r[k]:.3f}" if k in r else "n/a"

    for r in rows:
        sp = (f"{r['hf_eager_fwdbwd_ms'] / r['ours_fwdbwd_ms']:.2f}x"
              if "hf_eager_fwdbwd_ms" in r and "ours_fwdbwd_ms" in r else "n/a")
        lines.append(f"| {r['shape']} | {r['T']} | {f(r, 'ours_fwd_ms')} | {f(r, 'hf_eager_fwd_ms')} | "
                     f"{f(r, 'hf_grouped_mm_fwd_ms')} | {f(r, 'ours_fwdbwd_ms')} | {f(r, 'hf_eager_fwdbwd_ms')} | "
                     f"{f(r, 'hf_grouped_mm_fwdbwd_ms')} | {sp} |")
    errs = [f"{r['shape']} T={r['T']} {k}: {v}" for r in rows for k, v in r.items() if k.endswith("_error")]
    if errs:
        lines += ["", "Failures (not timed):"] + [f"- {e}" for e in sorted(set(errs))]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="one shape, T=1 and 16")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available; run without --device for the CPU sizes")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    shapes, tokens = (GPU_SHAPES, GPU_TOKENS) if gpu else (CPU_SHAPES, CPU_TOKENS)
    if args.quick:
        shapes, tokens = dict(list(shapes.items())[:1]), tokens[:2]
    reps = args.reps or (20 if gpu else 5)
    if not gpu:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    import transformers
    meta = {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
            "transformers": transformers.__version__, "date": dt.date.today().isoformat(),
            "device_name": torch.cuda.get_device_name(device) if gpu else f"CPU {platform.processor() or platform.machine()} "
                                                                          f"x{torch.get_num_threads()} threads",
            "reps": reps}
    rows = []
    for name, (E, K, D, F) in shapes.items():
        for T in tokens:
            r = run_case(name, E, K, D, F, T, device, dtype, reps)
            rows.append(r)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "quick_" if args.quick else ""
    (out / f"moe_layer_{tag}{device.type}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    md = markdown(rows, meta)
    (out / f"moe_layer_{tag}{device.type}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
