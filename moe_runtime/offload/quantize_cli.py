"""`moe quantize`: write a checkpoint whose routed experts are stored quantised, so `moe generate` /
`moe serve` load the quantised bytes straight into the host store (no quantisation at start-up).

    moe quantize --checkpoint runs/tiny --expert-dtype int4 --out runs/tiny-int4
    moe generate --checkpoint runs/tiny-int4 --gpu-expert-slots 8 --prompt "def "

Legend: L MoE layers, E experts, D model dim, F expert hidden dim.

The output is our ordinary checkpoint format (core/checkpoint.py: safetensors shard, sealed msgpack
manifest with every shard's size and sha256, per-tensor crc32, atomic rename): the dense tensors
under model/<name> as in the source, and each MoE layer's quantised fields under
quant/<bank>/<w13|w2>/<field> ([E, ...], kernels/quant.py's layout). The manifest's train_state
records {"quantized_experts": {"format", "group", "source"}}; the run config is the source's.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moe_runtime.kernels import quant as kq

QUANT_KEY = "quantized_experts"


def register(sub) -> None:
    """`moe quantize` (entry point in the `moe_runtime.commands` group, see core/cli.py)."""
    p = sub.add_parser("quantize", help="write a checkpoint with quantised routed experts (int8 / int4 / mxfp4)",
                       description="Quantise a checkpoint's routed experts once, into a sealed checkpoint that "
                                   "`moe generate` and `moe serve` load as it is.")
    p.add_argument("--checkpoint", required=True, help="run directory (newest checkpoint) or a step_NNNNNNNN dir")
    p.add_argument("--expert-dtype", required=True, choices=list(kq.FORMATS), help="quantised expert format")
    p.add_argument("--expert-group", type=int, default=None, help="int4 group size (32..128, default 64)")
    p.add_argument("--out", required=True, help="output run directory (the checkpoint goes into step_NNNNNNNN)")
    p.set_defaults(func=run_quantize)


def _bank_names(model) -> list[str]:
    from moe_runtime.core.experts import ExpertBank
    return [name for name, mod in model.named_modules() if isinstance(mod, ExpertBank)]


@torch.no_grad()
def quantize_checkpoint(src: str | Path, out: str | Path, fmt: str, group: int | None = None) -> Path:
    """Quantise src's routed experts to `fmt`; returns the written checkpoint directory."""
    from moe_runtime.core.checkpoint import save_checkpoint
    from moe_runtime.core.modelio import load_model
    g = kq.check_format(fmt, group)
    model, run, ck = load_model(src, device="cpu")
    if ck.manifest.train_state.get(QUANT_KEY):
        raise ValueError(f"{ck.path} already holds quantised experts; quantise the original checkpoint instead")
    banks = _bank_names(model)
    if not banks:
        raise ValueError(f"{ck.path} has no MoE layers: there are no experts to quantise")
    expert_params = {f"{b}.{w}" for b in banks for w in ("w13_EDF2", "w2_EFD")}
    tensors = {f"model/{k}": v.contiguous() for k, v in model.state_dict().items() if k not in expert_params}
    mods = dict(model.named_modules())
    for b in banks:
        qe = kq.quantize_experts(mods[b].w13_EDF2, mods[b].w2_EFD, fmt, g)
        for wname, qw in (("w13", qe.w13), ("w2", qe.w2)):
            for field, t in qw.fields.items():
                tensors[f"quant/{b}/{wname}/{field}"] = t.contiguous()
    state = {QUANT_KEY: {"format": fmt, "group": g, "source": str(ck.path)}}
    return save_checkpoint(out, ck.step, tensors, ck.manifest.config, state)


def quantized_format(path: str | Path) -> tuple[str, int] | None:
    """(format, group) when the checkpoint at path holds quantised experts, else None."""
    from moe_runtime.core.checkpoint import read_manifest
    from moe_runtime.core.modelio import resolve_checkpoint
    info = read_manifest(resolve_checkpoint(path)).train_state.get(QUANT_KEY)
    return None if not info else (str(info["format"]), int(info["group"]))


@torch.no_grad()
def load_quantized(path: str | Path, *, pin: bool | None = None):
    """(model with dense weights and empty expert banks, run config, filled quantised HostExpertStore)
    from a checkpoint written by quantize_checkpoint; every tensor is checked (sha256 per shard, crc32
    per tensor) as it is read. The experts never exist in float."""
    from moe_runtime.core.checkpoint import Checkpoint
    from moe_runtime.core.config import RunConfig
    from moe_runtime.core.hf.load import _empty_model
    from moe_runtime.core.manifest import CheckpointError
    from moe_runtime.core.modelio import resolve_checkpoint
    from moe_runtime.offload.store import ExpertLayout, HostExpertStore
    ck = Checkpoint(resolve_checkpoint(path))
    info = ck.manifest.train_state.get(QUANT_KEY)
    if not info:
        raise ValueError(f"{ck.path} holds float experts; write a quantised copy with `moe quantize`")
    fmt, g = str(info["format"]), int(info["group"])
    run = RunConfig.from_dict(ck.manifest.config, source=str(ck.path))
    dtype = getattr(torch, ck.manifest.tensors["model/embed.weight"].dtype)
    model = _empty_model(run.model, dtype, torch.device("cpu"), load_experts=False)  # experts stay on meta
    banks = _bank_names(model)
    expert_keys = {f"{b}.{w}" for b in banks for w in ("w13_EDF2", "w2_EFD")}
    dense = [k for k in model.state_dict() if k not in expert_keys]
    missing = [k for k in dense if f"model/{k}" not in ck.manifest.tensors]
    if missing:
        raise CheckpointError(f"{ck.path} lacks dense tensors {missing[:5]}; it was written for another model")
    model.load_state_dict({k: ck.tensor(f"model/{k}") for k in dense}, strict=False)
    m = run.model
    layout = ExpertLayout(num_layers=len(banks), num_experts=m.moe.num_experts, d_model=m.d_model,
                          d_expert=m.moe.d_expert, dtype=model.embed.weight.dtype, quant=fmt, group=g)
    store = HostExpertStore(layout, pin=pin)
    for layer, b in enumerate(banks):
        dst = store.quant_layer(layer)
        for wname, qw in (("w13", dst.w13), ("w2", dst.w2)):
            for field, t in qw.fields.items():
                src = ck.tensor(f"quant/{b}/{wname}/{field}")
                if src.shape != t.shape or src.dtype != t.dtype:
                    raise CheckpointError(f"{ck.path}: quant/{b}/{wname}/{field} is {src.dtype} {tuple(src.shape)}, "
                                          f"the model needs {t.dtype} {tuple(t.shape)}")
                t.copy_(src)
    return model.eval(), run, store


def run_quantize(args: argparse.Namespace) -> int:
    out = quantize_checkpoint(args.checkpoint, args.out, args.expert_dtype, args.expert_group)
    fmt, g = quantized_format(out)
    print(f"wrote {out} ({fmt}, group {g})")
    return 0


__all__ = ["register", "quantize_checkpoint", "load_quantized", "quantized_format", "QUANT_KEY"]
