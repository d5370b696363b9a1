"""Fused-dequantisation grouped expert MLP (kernels/quant_gemm.py) vs the bf16 grouped MLP, on CUDA.

    python bench/quant_kernel_bench.py                 # writes bench/results/quant_kernel_cuda.{json,md}
    python bench/quant_kernel_bench.py --d 1024 --f 2816 --experts 8 --rows 16 64

Per format (bf16 = kernels/grouped_gemm.py's grouped_mlp_triton; int8 / int4 / mxfp4 =
grouped_mlp_quant_triton on the quantised bank), for each row count: median time (triton.testing.do_bench),
effective GB/s of expert weights read (all E experts' bytes / time), and the max error against
dequantise-then-reference in bf16. Needs CUDA and Triton; not run on CPU (the interpreter tests cover
correctness there: tests/test_quant_kernels.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_runtime.kernels import quant as kq  # noqa: E402
from moe_runtime.kernels.reference import grouped_mlp_reference  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--f", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 256])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA: the fused kernel's CPU check is tests/test_quant_kernels.py (interpreter)")
    import triton.testing
    from moe_runtime.kernels.grouped_gemm import grouped_mlp_triton
    from moe_runtime.kernels.quant_gemm import grouped_mlp_quant_triton
    D, F, E = args.d, args.f, args.experts
    dev = "cuda"
    # drawn on the GPU: 1.4 G fp32 values at the Mixtral shape take ~10 s on host cores, of a 100 s step
    g = torch.Generator(device=dev).manual_seed(0)
    w13 = torch.randn(E, D, 2 * F, generator=g, device=dev).div_(D ** 0.5)
    w2 = torch.randn(E, F, D, generator=g, device=dev).div_(F ** 0.5)
    banks = {"bf16": (w13.to(torch.bfloat16), w2.to(torch.bfloat16))}
    for fmt in kq.FORMATS:
        banks[fmt] = kq.quantize_experts(w13, w2, fmt)  # on the GPU: the host has little time
    del w13, w2
    rows = []
    for N in args.rows:
        counts = torch.bincount(torch.arange(N) % E, minlength=E).to(dev)
        x = torch.randn(N, D, generator=g, device=dev).to(torch.bfloat16)
        for fmt, bank in banks.items():
            if fmt == "bf16":
                fn = lambda: grouped_mlp_triton(x, bank[0], bank[1], counts)  # noqa: E731
                ref_w = bank
                nbytes = E * kq.expert_bytes(D, F, "bf16")
            else:
                fn = lambda bank=bank: grouped_mlp_quant_triton(x, bank, counts)  # noqa: E731
                ref_w = bank.dequantize(torch.bfloat16)
                nbytes = E * kq.expert_bytes(D, F, fmt)
            y = fn()
            ref = grouped_mlp_reference(x.float(), ref_w[0].float(), ref_w[1].float(), counts)
            err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1))
            ms = triton.testing.do_bench(fn, warmup=25, rep=100)
            rows.append({"format": fmt, "rows": N, "ms": ms, "weight_gbps": nbytes / (ms * 1e-3) / 1e9,
                         "max_rel_err_vs_dequant_ref": err})
            print(rows[-1], flush=True)
    res = {"device": torch.cuda.get_device_name(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "shape": {"D": D, "F": F, "E": E}, "torch": torch.__version__, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_kernel_cuda.json").write_text(json.dumps(res, indent=2))
    md = (f"Fused-dequantisation grouped MLP vs bf16 on {res['device']}, {res['date']}, D={D} F={F} E={E}\n\n"
          "| format | rows | ms | weight GB/s | max rel err vs dequant ref |\n|---|---:|---:|---:|---:|\n"
          + "".join(f"| {r['format']} | {r['rows']} | {r['ms']:.3f} | {r['weight_gbps']:.0f} | "
                    f"{r['max_rel_err_vs_dequant_ref']:.1e} |\n" for r in rows))
    (out / "quant_kernel_cuda.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
