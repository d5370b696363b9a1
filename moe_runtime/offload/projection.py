"""Projection of a routing trace onto a real model shape and host link: tokens/s, bytes/token, stall.

Legend: L MoE layers, E experts, K top-k, D model dim, F expert hidden dim, n tokens per expert.

A projection is the simulator (offload/simulate.py, the engine's own Planner) run with a
Calibration built from the constants below instead of one measured on this machine. Every
constant names its source; none is a measurement made by this code. The trace supplies routing
only; its layer count may differ from the shape's, so per-token figures scale by L_shape / L_trace
(each layer of the shape is assumed to behave like an average layer of the trace). Time per token
counts attention + router (attn_s per MoE layer), expert compute and stall; embedding, LM head and
sampling are left out (a few % at batch 1).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moe_runtime.kernels.quant import EXPERT_DTYPES, check_format, expert_bytes
from moe_runtime.offload.cpu_experts import Calibration

HBM_BYTES_PER_S = 2.6e12
"""Device memory bandwidth achieved by an expert GEMV: H100 SXM HBM3 spec 3.35 TB/s, assumed 78% achieved
(assumption; the project has not measured it)."""
DEVICE_FLOPS = 660e12
"""Dense bf16 GEMM on an H100 80GB HBM3: 660-680 TFLOP/s, measured by this project (torch 2.11, 2026-11-22)."""
HOST_S_PER_TOKEN_PER_BYTE = 8.3e-3 / 352e6
"""16 host cores run one Mixtral expert (352 MB bf16) for one token in 8.3 ms (measured by this project beside
an H100, torch 2.11, 2026-11-22); scaled by expert bytes and linearly in tokens (an assumption; used only
with cpu_experts)."""

SPLIT_GPU_S = 2 * 7e-6
SPLIT_GPU_SOURCE = ("a split run's two small transfers on the GPU side, the activation rows to the host "
                    "(a blocking cudaMemcpy: the host sync) and the partial W13 result back, at the 6-7 us "
                    "overhead per cudaMemcpy that NVIDIA's GDRCopy README states (github.com/NVIDIA/gdrcopy); "
                    "an assumption, not measured by this project")
"""What a split run adds on a GPU beyond its host and device work; the bench adds the CPU-side cost it
measures on its own machine (bench/cache_policies.py: split_overhead)."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    name: str
    num_layers: int
    num_experts: int
    top_k: int
    d_model: int
    d_expert: int
    bytes_per_param: float = 2
    """2: bf16 weights; 1: FP8 (DeepSeek-V3 as released); 4.25 / 8: MXFP4 (4-bit values plus one
    8-bit scale per 32 values; gpt-oss): the shape's own format as released, modelled. A projection
    in another format (format_calibration, `--expert-dtype`) takes its bytes from kernels/quant.py."""
    shared_experts: int = 0
    """Always-used experts (DeepSeek-V3's shared expert): resident on the device, their run is added
    to every layer's non-expert time."""
    source: str = ""
    attn_s: float = 0.3e-3
    """Attention + router per MoE layer at decode."""
    attn_source: str = ""

    @property
    def expert_bytes(self) -> int:
        return round(3 * self.d_model * self.d_expert * self.bytes_per_param)  # w1, w3 [D, F] and w2 [F, D]


@dataclass(frozen=True, kw_only=True)
class Link:
    name: str
    bytes_per_s: float
    source: str


_ATTN = ("0.3 ms per layer: the H100 figure of issue 14 (Mixtral-8x7B decode, attention + router); for the "
         "smaller shapes assumed equal, since batch-1 attention is launch-bound, not size-bound")
SHAPES = {s.name: s for s in (
    ModelShape(name="mixtral-8x7b", num_layers=32, num_experts=8, top_k=2, d_model=4096, d_expert=14336,
               attn_source=_ATTN),
    ModelShape(name="qwen3-30b-a3b", num_layers=48, num_experts=128, top_k=8, d_model=2048, d_expert=768,
               attn_source=_ATTN),
    ModelShape(name="olmoe-1b-7b", num_layers=16, num_experts=64, top_k=8, d_model=2048, d_expert=1024,
               attn_source=_ATTN),
    ModelShape(name="gpt-oss-120b", num_layers=36, num_experts=128, top_k=4, d_model=2880, d_expert=2880,
               bytes_per_param=4.25 / 8, attn_source=_ATTN,
               source="https://huggingface.co/openai/gpt-oss-120b/blob/main/config.json (num_hidden_layers 36, "
                      "num_local_experts 128, num_experts_per_tok 4, hidden_size 2880, intermediate_size 2880); "
                      "experts in MXFP4 (model card): 4.25 bits per weight, modelled"),
    ModelShape(name="qwen3-235b-a22b", num_layers=94, num_experts=128, top_k=8, d_model=4096, d_expert=1536,
               attn_source=_ATTN,
               source="https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json (num_hidden_layers 94, "
                      "num_experts 128, num_experts_per_tok 8, hidden_size 4096, moe_intermediate_size 1536); bf16"),
    ModelShape(name="deepseek-v3", num_layers=58, num_experts=256, top_k=8, d_model=7168, d_expert=2048,
               bytes_per_param=1, shared_experts=1, attn_source=_ATTN,
               source="https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (61 layers, "
                      "first_k_dense_replace 3 -> 58 MoE layers, n_routed_experts 256, num_experts_per_tok 8, "
                      "n_shared_experts 1, hidden_size 7168, moe_intermediate_size 2048); FP8 weights as released"),
)}
LINKS = {l.name: l for l in (
    Link(name="h100-pcie5", bytes_per_s=54.8e9,
         source="pinned host->device on an H100, PCIe Gen5 x16, measured by this project (2026-11-22; "
                "pageable memory gave 8-11 GB/s)"),
    Link(name="pcie4", bytes_per_s=25e9,
         source="assumption: PCIe 4.0 x16 is 31.5 GB/s raw; ~25 GB/s is the usual pinned host->device figure"),
)}


def _lookup(table: dict, name: str, what: str):
    if name not in table:
        raise ValueError(f"--{what} {name!r} is not one of {', '.join(table)}")
    return table[name]


def projection_calibration(shape: str | ModelShape, link: str | Link, *,
                           host_s_per_byte: float | None = None) -> Calibration:
    """The Calibration a device with this shape and link would measure, from the constants above
    (`host_s_per_byte` replaces the host constant: a sensitivity row)."""
    hs = HOST_S_PER_TOKEN_PER_BYTE if host_s_per_byte is None else host_s_per_byte
    s = _lookup(SHAPES, shape, "model-shape") if isinstance(shape, str) else shape
    k = _lookup(LINKS, link, "link") if isinstance(link, str) else link
    grid = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    flops = [6 * s.d_model * s.d_expert * n for n in grid]
    return Calibration(
        device=f"projection: {s.name} on {k.name}", expert_bytes=s.expert_bytes,
        copy_s=s.expert_bytes / k.bytes_per_s, tokens=grid,
        host_s=tuple(hs * s.expert_bytes * n for n in grid),
        device_s=tuple(s.expert_bytes / HBM_BYTES_PER_S + f / DEVICE_FLOPS for f in flops),
        act_s_per_token=0.0,
        attn_s=s.attn_s + s.shared_experts * (s.expert_bytes / HBM_BYTES_PER_S + 6 * s.d_model * s.d_expert / DEVICE_FLOPS))


def constants(shape: str, link: str) -> dict[str, Any]:
    """Every constant of a projection, with its source (printed by `moe trace simulate`)."""
    s, k = SHAPES[shape], LINKS[link]
    cal = projection_calibration(s, k)
    return {"shape": shape, "link": link, "layers": s.num_layers, "experts": s.num_experts, "top_k": s.top_k,
            "expert_mb": s.expert_bytes / 1e6, "link_gb_s": k.bytes_per_s / 1e9, "link_source": k.source,
            "copy_ms": cal.copy_s * 1e3, "attn_ms": s.attn_s * 1e3, "attn_source": s.attn_source,
            "expert_ms_1_token": cal.device_s[0] * 1e3, "host_ms_1_token": cal.host_s[0] * 1e3,
            "host_source": "8.3 ms per 352 MB Mixtral expert at batch 1, bf16, 16 host cores of the lent H100 machine "
                           "(measured November 2026), scaled by expert bytes", "shape_source": s.source,
            "expert_source": f"bytes / {HBM_BYTES_PER_S / 1e12:.1f} TB/s (H100 HBM3 spec 3.35, 78% assumed) + "
                             f"FLOPs / {DEVICE_FLOPS / 1e12:.0f} TFLOP/s (measured)"}


def project(row: dict[str, Any], trace_layers: int, shape: str) -> dict[str, Any]:
    """Per-token figures of a simulated row's decode passes, scaled to the shape's layer count."""
    d, scale = row["decode"], SHAPES[shape].num_layers / trace_layers
    tok = d["tokens"]
    if not tok:
        return {"tokens_per_s": None, "bytes_per_token": None, "stall_ms_per_token": None, "copies_per_token": None}
    return {"tokens_per_s": tok / (d["time_s"] * scale) if d["time_s"] else None,
            "bytes_per_token": d["bytes_moved"] / tok * scale, "stall_ms_per_token": d["stall_s"] / tok * scale * 1e3,
            "copies_per_token": d["copies"] / tok * scale}


# ---------------------------------------------------------------- expert formats (issue 20 item 3)

HOST_RATIOS_FILE = Path(__file__).resolve().parents[2] / "bench" / "results" / "quant_quality.json"
"""Where the host-time ratio of each expert format vs bf16 is read: bench/quant_quality.py's host rows
(`host_expert_path`: one expert at one token on this project's CPU, formats interleaved, medians)."""
DEVICE_FORMAT_SOURCE = ("assumption, not measured: the fused-dequantisation kernel (kernels/quant_gemm.py) reads "
                        "the quantised bytes at the same achieved HBM bandwidth as a bf16 expert GEMV and hides the "
                        "decode under the loads (memory-bound scaling by bytes); FLOPs as bf16. "
                        "bench/quant_kernel_bench.py measures it on a GPU")


@dataclass(frozen=True)
class ExpertFormat:
    """One expert format of a projection: its bytes per expert on a shape and its host-time ratio."""

    dtype: str
    group: int | None = None
    """int4 group size (None: the format's default, kernels/quant.DEFAULT_GROUP)."""

    @property
    def label(self) -> str:
        return self.dtype if self.dtype != "int4" else f"int4/{check_format('int4', self.group)}"

    def expert_bytes(self, s: ModelShape) -> int:
        return expert_bytes(s.d_model, s.d_expert, self.dtype, self.group)


def parse_formats(spec: str, group: int | None = None) -> list[ExpertFormat]:
    """'bf16,int4' (--expert-dtype) -> formats; `group` (--expert-group) applies to int4 only."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in EXPERT_DTYPES]
    if bad or not names:
        raise ValueError(f"--expert-dtype {spec!r}: each of a comma-separated list must be one of "
                         f"{', '.join(EXPERT_DTYPES)}")
    if group is not None:
        if "int4" not in names:
            raise ValueError(f"--expert-group {group} applies to int4 only; add int4 to --expert-dtype or drop it")
        check_format("int4", group)
    return [ExpertFormat(n, group if n == "int4" else None) for n in names]


def _host_time(row: dict) -> float | None:
    """A host row's time per expert: the thread's CPU time where recorded (other processes' load disturbs it
    least), else the wall-clock median."""
    return row.get("cpu_median_s") or row.get("median_s")


def host_time_ratio(fmt: ExpertFormat, path: str | Path | None = None) -> tuple[float, str]:
    """(host seconds per expert in `fmt` / in bf16, its source), from bench/quant_quality.json's host rows
    (`path` replaces that file). bf16 is 1 by definition. A file without the format is refused."""
    if fmt.dtype == "bf16":
        return 1.0, "bf16: the host constant itself"
    p = Path(path) if path is not None else HOST_RATIOS_FILE
    if not p.is_file():
        raise ValueError(f"{p}: no such file; the host time of {fmt.label} experts comes from its host rows: "
                         "run `python bench/quant_quality.py` or pass --host-ratios PATH")
    data = json.loads(p.read_text())
    rows = data.get("host_expert_path")
    if not isinstance(rows, list):
        raise ValueError(f"{p}: no 'host_expert_path' rows (the host time per expert format); "
                         "run `python bench/quant_quality.py` to write them")
    by = {r.get("format"): r for r in rows if isinstance(r, dict)}
    for need in ("bf16", fmt.dtype):
        if need not in by or not _host_time(by[need]):
            raise ValueError(f"{p}: its host rows have no {need!r} time (they hold {', '.join(map(str, by))}); "
                             f"a projection of {fmt.label} experts needs it: run `python bench/quant_quality.py`")
    r = by[fmt.dtype]
    # bf16's fastest host path is the baseline (torch's matmul beats the C kernel on CPUs without AVX512-BF16).
    b = min((by[k] for k in ("bf16", "bf16-torch") if k in by and _host_time(by[k])), key=_host_time)
    ratio = _host_time(r) / _host_time(b)
    a, when = data.get("args", {}), data.get("host_measured", data)
    kind = "CPU time of the calling thread" if "cpu_median_s" in r else "wall time"
    shape = f"D={a['host_d']} F={a['host_f']}, " if "host_d" in a and "host_f" in a else ""
    grp = f" (measured at group {r['group']})" if r.get("group") is not None else ""
    src = (f"{p.name} host_expert_path, measured {when.get('date', '?')} on {when.get('machine', '?')}: one expert "
           f"({shape}1 token, {kind}, median) {_host_time(r) * 1e3:.2f} ms in {fmt.dtype}{grp} vs "
           f"{_host_time(b) * 1e3:.2f} ms in bf16 ({b.get('path', b['format'])}), ratio {ratio:.2f}; "
           "assumed to carry over to the projected host's cores")
    return ratio, src


def equal_gib_slots(bf16_slots: int, total: int, fmt_bytes: int, bf16_bytes: int) -> int:
    """Experts of `fmt_bytes` that fit in the slot memory of `bf16_slots` bf16 experts (at most `total`)."""
    return max(1, min(total, bf16_slots * bf16_bytes // fmt_bytes))


def format_calibration(shape: str | ModelShape, link: str | Link, fmt: ExpertFormat, *,
                       host_ratios: str | Path | None = None, host_s_per_byte: float | None = None,
                       device_slowdown: float = 1.0) -> Calibration:
    """projection_calibration with experts in `fmt`: copy over the link and device run by the format's bytes,
    host run = the bf16 host time x the format's measured host-time ratio (host_time_ratio).
    `device_slowdown` multiplies a quantised expert's device time (a sensitivity row for DEVICE_FORMAT_SOURCE's
    assumption; bf16 keeps its own)."""
    s = _lookup(SHAPES, shape, "model-shape") if isinstance(shape, str) else shape
    k = _lookup(LINKS, link, "link") if isinstance(link, str) else link
    ratio, _ = host_time_ratio(fmt, host_ratios)
    hs = HOST_S_PER_TOKEN_PER_BYTE if host_s_per_byte is None else host_s_per_byte
    bf16 = expert_bytes(s.d_model, s.d_expert, "bf16")
    nbytes = fmt.expert_bytes(s)
    # bytes_per_param chosen so that ModelShape.expert_bytes is the format's (copies, device reads)
    fs = replace(s, bytes_per_param=nbytes / (3 * s.d_model * s.d_expert))
    # host: the bf16 time of this shape's expert times the ratio, expressed per byte of the format's expert
    cal = projection_calibration(fs, k, host_s_per_byte=hs * bf16 * ratio / fs.expert_bytes)
    slow = device_slowdown if fmt.dtype != "bf16" else 1.0
    return replace(cal, device=f"projection: {s.name} on {k.name}, experts {fmt.label}",
                   device_s=tuple(slow * t for t in cal.device_s))


def format_constants(shape: str, link: str, fmt: ExpertFormat, *, host_ratios: str | Path | None = None,
                     bf16_fraction: float | None = None, device_slowdown: float = 1.0) -> dict[str, Any]:
    """constants() for experts in `fmt`, with bytes, host RAM and (with `bf16_fraction`) the experts the slot
    memory of that share of the experts in bf16 holds in this format; every value with its source."""
    s = SHAPES[shape]
    cal = format_calibration(shape, link, fmt, host_ratios=host_ratios, device_slowdown=device_slowdown)
    ratio, src = host_time_ratio(fmt, host_ratios)
    bf16, nbytes, total = expert_bytes(s.d_model, s.d_expert, "bf16"), fmt.expert_bytes(s), s.num_layers * s.num_experts
    out = {**constants(shape, link), "expert_dtype": fmt.dtype, "expert_format": fmt.label,
           "expert_bytes": nbytes, "bf16_expert_bytes": bf16, "expert_mb": nbytes / 1e6, "bf16_expert_mb": bf16 / 1e6,
           "bytes_vs_bf16": bf16 / nbytes,
           "bytes_source": "kernels/quant.expert_bytes (codes + scales (+ zeros) of W13 [D, 2F] and W2 [F, D])",
           "host_ram_gib": total * nbytes / 2**30, "bf16_host_ram_gib": total * bf16 / 2**30,
           "copy_ms": cal.copy_s * 1e3, "expert_ms_1_token": cal.device_s[0] * 1e3,
           "host_ms_1_token": cal.host_s[0] * 1e3, "host_ratio_vs_bf16": ratio,
           "host_source": "8.3 ms per 352 MB bf16 Mixtral expert at batch 1, 16 host cores of the lent H100 machine "
                          f"(measured November 2026), scaled by bf16 expert bytes, x {ratio:.2f}: {src}",
           "expert_source": constants(shape, link)["expert_source"] if fmt.dtype == "bf16" else DEVICE_FORMAT_SOURCE
           if device_slowdown == 1.0 else f"sensitivity: {device_slowdown:g}x the time of this assumption: "
           + DEVICE_FORMAT_SOURCE, "device_slowdown": device_slowdown if fmt.dtype != "bf16" else 1.0}
    if bf16_fraction is not None:
        slots = equal_gib_slots(round(bf16_fraction * total), total, nbytes, bf16)
        out.update(bf16_fraction=bf16_fraction, slot_gib=round(bf16_fraction * total) * bf16 / 2**30,
                   equal_gib_slots=slots, equal_gib_fraction=slots / total)
    return out


__all__ = ["SPLIT_GPU_S", "SPLIT_GPU_SOURCE", "ModelShape", "Link", "SHAPES", "LINKS", "projection_calibration", "constants", "project",
           "HOST_RATIOS_FILE", "DEVICE_FORMAT_SOURCE", "ExpertFormat", "parse_formats", "host_time_ratio",
           "equal_gib_slots", "format_calibration", "format_constants"]
