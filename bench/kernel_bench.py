"""Expert-MLP kernels on the GPU: Triton fused MLP vs torch._grouped_mm vs a per-expert loop vs dense GEMM.

    python bench/kernel_bench.py                                   # H100: all layers, T = 16 512 8192 32768, fwd and fwd+bwd
    python bench/kernel_bench.py --layers olmoe-1b-7b --tokens 8192 --modes fwd      # one cell
    TRITON_INTERPRET=1 python bench/kernel_bench.py --dry-run      # CPU: checks the benchmarked calls agree; no timings

Legend: T tokens, K top-k, N = T*K routed rows, D model dim, F expert hidden dim, E experts.

For each layer shape (Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B) and token count T, a random router
assigns each token K distinct experts and the N rows are sorted by expert. Every implementation
computes the same SwiGLU expert MLP on those rows, bf16 with fp32 accumulation:
    triton      kernels.grouped_gemm.grouped_mlp_triton (one launch per GEMM over all experts, SwiGLU fused)
    grouped_mm  torch._grouped_mm -> swiglu -> torch._grouped_mm
    loop        a Python loop over the experts on host-side counts (the Hugging Face eager style)
    dense       one [N, D] x [D, 2F] and one [N, F] x [F, D] GEMM: the same FLOPs with no routing
Outputs and gradients are checked against the loop before anything is timed (a mismatch aborts).
Times are medians of triton.testing.do_bench; FLOPs are 6*N*D*F forward and 3x that for fwd+bwd
(dX and dW of both GEMMs). Results: bench/results/kernels_<device>.json and .md, with device and date.
Refuses to run without CUDA (except --dry-run): no CPU number stands in for a GPU one.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

import torch

# run as a script from a checkout: the repo root on the path for moe_runtime
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LAYERS = {  # name -> (E, K, D, F)
    "mixtral-8x7b": (8, 2, 4096, 14336),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "olmoe-1b-7b": (64, 8, 2048, 1024),
}
TOKENS = (16, 512, 8192, 32768)
MODES = ("fwd", "fwd+bwd")
IMPLS = ("triton", "grouped_mm", "loop", "dense")
DRY_RUN_DIMS = (32, 48)  # D, F of the --dry-run check; E and K stay those of each layer
DRY_RUN_TOKENS = 8
CHECK_TOLERANCE = 2e-2   # max |error| / max(1, max |reference|), bf16 with fp32 accumulation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS), help="tokens T per layer call")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--warmup-ms", type=float, default=50.0, help="do_bench warm-up time")
    p.add_argument("--rep-ms", type=float, default=200.0, help="do_bench measuring time")
    p.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true",
                   help="no timing: check every implementation against the loop on tiny shapes (CPU with "
                        "TRITON_INTERPRET=1, or the GPU)")
    args = p.parse_args(argv)
    if any(t <= 0 for t in args.tokens):
        p.error(f"--tokens must be positive, got {args.tokens}")
    return args


# ---------------------------------------------------------------- the implementations

def swiglu(h: torch.Tensor) -> torch.Tensor:
    from moe_runtime.kernels.reference import swiglu as _swiglu
    return _swiglu(h)


def mlp_triton(x, w13, w2, counts, offs):
    from moe_runtime.kernels.grouped_gemm import grouped_mlp_triton
    return grouped_mlp_triton(x, w13, w2, counts)


def mlp_grouped_mm(x, w13, w2, counts, offs):
    return torch._grouped_mm(swiglu(torch._grouped_mm(x, w13, offs=offs)), w2, offs=offs)


def mlp_loop(x, w13, w2, counts, offs):
    sizes = counts.tolist()  # host sync: the eager style needs the counts as Python ints
    outs = [swiglu(xe @ w13[e]) @ w2[e] for e, xe in enumerate(x.split(sizes)) if sizes[e]]
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[-1])


def mlp_dense(x, w13, w2, counts, offs):
    return swiglu(x @ w13) @ w2  # w13 [D, 2F], w2 [F, D]: one expert's worth of weights, all N rows


IMPL_FNS = {"triton": mlp_triton, "grouped_mm": mlp_grouped_mm, "loop": mlp_loop, "dense": mlp_dense}


def grouped_mm_available(device: torch.device) -> str | None:
    """None if torch._grouped_mm runs forward and backward here, else why not."""
    from moe_runtime.kernels.reference import grouped_mm_supported
    if grouped_mm_supported(device.type, torch.bfloat16):
        return None
    return f"torch._grouped_mm has no working bf16 forward+backward on {device.type} in torch {torch.__version__}"


# ---------------------------------------------------------------- inputs and checks

def make_inputs(E: int, K: int, D: int, F: int, T: int, device, dtype, seed: int) -> dict:
    """Rows sorted by expert for T tokens routed to K distinct experts, weights, and dense twins."""
    from moe_runtime import kernels
    g = torch.Generator(device="cpu").manual_seed(seed)
    topk_idx = torch.randn(T, E, generator=g).topk(K, dim=-1).indices
    _, counts = kernels.sort_by_expert(topk_idx, E)
    N = T * K

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)
    return dict(
        x=rand(N, D), w13=rand(E, D, 2 * F, scale=D ** -0.5), w2=rand(E, F, D, scale=F ** -0.5),
        dense_w13=rand(D, 2 * F, scale=D ** -0.5), dense_w2=rand(F, D, scale=F ** -0.5), dy=rand(N, D),
        counts=counts.to(device), offs=torch.cumsum(counts, 0, dtype=torch.int32).to(device), N=N)


def leaves(impl: str, inp: dict, backward: bool) -> list[torch.Tensor]:
    """(x, w13, w2) for `impl`, requiring grad for fwd+bwd; dense has weights of its own shapes."""
    w13, w2 = (inp["dense_w13"], inp["dense_w2"]) if impl == "dense" else (inp["w13"], inp["w2"])
    return [t.detach().requires_grad_(backward) for t in (inp["x"], w13, w2)]


def run(impl: str, inp: dict, backward: bool):
    """One call of `impl`; returns (y, grads or None)."""
    leaves_ = leaves(impl, inp, backward)
    if not backward:
        with torch.no_grad():
            return IMPL_FNS[impl](*leaves_, inp["counts"], inp["offs"]), None
    y = IMPL_FNS[impl](*leaves_, inp["counts"], inp["offs"])
    return y, torch.autograd.grad(y, leaves_, inp["dy"])


def max_rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1.0)).item()


def check(impls: list[str], inp: dict, label: str) -> None:
    """Every routed implementation agrees with the loop, forward and all gradients; else SystemExit."""
    ref_y, ref_grads = run("loop", inp, backward=True)
    for impl in impls:
        if impl in ("loop", "dense"):
            continue
        y, grads = run(impl, inp, backward=True)
        errors = {"y": max_rel_error(y, ref_y)}
        errors.update({f"d{n}": max_rel_error(g, r) for n, g, r in zip(("x", "w13", "w2"), grads, ref_grads)})
        worst = max(errors, key=errors.get)
        if errors[worst] > CHECK_TOLERANCE or any(v != v for v in errors.values()):
            raise SystemExit(f"{label}: {impl} disagrees with the per-expert loop: {worst} relative error "
                             f"{errors[worst]:.3g} > {CHECK_TOLERANCE} (all: {errors}); not timing a wrong kernel")


# ---------------------------------------------------------------- timing and reporting

def time_ms(impl: str, inp: dict, backward: bool, warmup_ms: float, rep_ms: float) -> float:
    import triton.testing
    leaves_, fn = leaves(impl, inp, backward), IMPL_FNS[impl]
    if backward:
        call = lambda: fn(*leaves_, inp["counts"], inp["offs"]).backward(inp["dy"])  # noqa: E731
    else:
        def call():
            with torch.no_grad():  # inference: the Triton MLP then keeps no activations for a backward
                fn(*leaves_, inp["counts"], inp["offs"])
    return triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves_ if backward else None,
                                   return_mode="median")


def markdown(report: dict) -> str:
    lines = [f"# Expert MLP kernels: {report['device']}", "",
             f"{report['date']} · torch {report['torch']} · triton {report['triton']} · bf16 · "
             "TFLOP/s (ratio to dense GEMM of the same FLOPs); median of triton.testing.do_bench", ""]
    for note in report["notes"]:
        lines.append(f"- {note}")
    impls = report["impls"]
    for mode in report["modes"]:
        lines += ["", f"## {mode}", "", "| layer | T | N | " + " | ".join(impls) + " |",
                  "|---|---:|---:|" + "---:|" * len(impls)]
        for (layer, T) in dict.fromkeys((r["layer"], r["T"]) for r in report["rows"] if r["mode"] == mode):
            cells = {r["impl"]: r for r in report["rows"] if (r["layer"], r["T"], r["mode"]) == (layer, T, mode)}
            N = next(iter(cells.values()))["N"]
            row = [f"{cells[i]['tflops']:.0f} ({cells[i]['ratio_to_dense']:.2f}x)" if i in cells else "n/a"
                   for i in impls]
            lines.append(f"| {layer} | {T} | {N} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def benchmark(args: argparse.Namespace) -> dict:
    import triton
    device = torch.device("cuda")
    impls = list(args.impls)
    notes = []
    if "grouped_mm" in impls and (why := grouped_mm_available(device)):
        impls.remove("grouped_mm")
        notes.append(f"grouped_mm skipped: {why}")
    rows = []
    for layer in args.layers:
        E, K, D, F = LAYERS[layer]
        for T in args.tokens:
            inp = make_inputs(E, K, D, F, T, device, torch.bfloat16, args.seed)
            check(impls, inp, f"{layer} T={T}")
            for mode in args.modes:
                flops = 6 * inp["N"] * D * F * (3 if mode == "fwd+bwd" else 1)
                timed = {i: time_ms(i, inp, mode == "fwd+bwd", args.warmup_ms, args.rep_ms) for i in impls}
                dense_tflops = flops / timed["dense"] / 1e9 if "dense" in timed else float("nan")
                for impl, ms in timed.items():
                    tflops = flops / ms / 1e9
                    rows.append(dict(layer=layer, E=E, K=K, D=D, F=F, T=T, N=inp["N"], mode=mode, impl=impl,
                                     ms=ms, tflops=tflops, ratio_to_dense=tflops / dense_tflops))
                    print(f"{layer:14s} T={T:6d} {mode:8s} {impl:10s} {ms:9.3f} ms {tflops:7.1f} TFLOP/s "
                          f"({tflops / dense_tflops:.2f}x dense)", flush=True)
            del inp
            torch.cuda.empty_cache()
    return dict(device=torch.cuda.get_device_name(device), date=dt.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, dtype="bfloat16",
                command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), impls=impls, modes=list(args.modes),
                notes=notes, rows=rows)


def dry_run(args: argparse.Namespace) -> None:
    """Every implementation on tiny shapes against the loop; prints, writes and times nothing."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impls = [i for i in args.impls if i != "grouped_mm" or grouped_mm_available(device) is None]
    D, F = DRY_RUN_DIMS
    for layer in args.layers:
        E, K, _, _ = LAYERS[layer]
        inp = make_inputs(E, K, D, F, DRY_RUN_TOKENS, device, torch.bfloat16, args.seed)
        check(impls, inp, f"dry run {layer}")
        for impl in impls:  # the no-grad path that the "fwd" timings take
            run(impl, inp, backward=False)
        print(f"dry run {layer} (E={E}, K={K}, D={D}, F={F}, T={DRY_RUN_TOKENS}) on {device}: "
              f"{', '.join(impls)} ran; routed ones agree with the loop")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            # the kernels are defined on first import, so the interpreter must be chosen before that
            os.environ["TRITON_INTERPRET"] = "1"
        dry_run(args)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_bench.py times GPU kernels and needs CUDA, which this machine lacks "
                         f"(torch {torch.__version__}). Run it on the H100; for a CPU correctness check of the "
                         "same calls use: TRITON_INTERPRET=1 python bench/kernel_bench.py --dry-run")
    report = benchmark(args)
    slug = re.sub(r"[^a-z0-9]+", "_", report["device"].lower()).strip("_")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"kernels_{slug}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / f"kernels_{slug}.md").write_text(markdown(report))
    print(f"wrote {args.out_dir / f'kernels_{slug}.json'} and .md")


if __name__ == "__main__":
    main()
