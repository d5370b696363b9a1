"""Hugging Face MoE checkpoints into the expert cache, without materialising the experts.

The dense part is built by core.hf.load_hf(load_experts=False) (routed experts stay on the meta
device); the routed experts stream shard by shard, one expert at a time, straight into the host
expert store (core.hf.iter_hf_expert_tensors). So a model whose experts do not fit in device
memory, or twice in host memory, still loads.

An MXFP4 gpt-oss checkpoint keeps its experts' bytes: with expert_dtype bf16 (the default) or mxfp4
the store is an mxfp4 store filled with the checkpoint's blocks and scales as they are (gate/up rows
de-interleaved), so `moe generate --hf` on it implies --expert-dtype mxfp4; int8 / int4 re-quantise
the dequantised values.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moe_runtime.core.config import RunConfig
from moe_runtime.core.hf import iter_hf_expert_tensors, load_hf, read_hf
from moe_runtime.core.model import MoETransformer
from moe_runtime.kernels.quant import quantize_experts
from moe_runtime.offload.store import ExpertLayout, HostExpertStore


def load_hf_for_cache(path: str | Path, *, dtype: torch.dtype | str | None = None, pin: bool | None = None,
                      max_seq_len: int | None = None, ignore_config_fields: tuple[str, ...] = (),
                      expert_dtype: str = "bf16", group: int | None = None
                      ) -> tuple[MoETransformer, RunConfig, Any, HostExpertStore]:
    """(model with dense weights only, run config, tokenizer or None, filled host expert store).
    max_seq_len / ignore_config_fields: as in core.hf.load_hf (`moe generate --max-seq-len / --ignore-config-field`).
    expert_dtype: int8 | int4 | mxfp4 quantises each expert as it streams in (bf16: as stored)."""
    model, run, tokenizer = load_hf(path, dtype=dtype, load_experts=False, max_seq_len=max_seq_len,
                                    ignore_config_fields=ignore_config_fields)
    ck = read_hf(path, max_seq_len=max_seq_len, ignore_config_fields=ignore_config_fields)
    raw_mx = ck.layout == "mxfp4" and expert_dtype in ("bf16", "mxfp4")
    if raw_mx:
        expert_dtype = "mxfp4"
    m = run.model
    layout = ExpertLayout(num_layers=m.num_moe_layers, num_experts=m.moe.num_experts, d_model=m.d_model,
                          d_expert=m.moe.d_expert, dtype=model.embed.weight.dtype,
                          quant=None if expert_dtype == "bf16" else expert_dtype, group=group or 0)
    store = HostExpertStore(layout, pin=pin)
    seen = 0
    for item in iter_hf_expert_tensors(ck, dtype=layout.dtype, raw_mxfp4=raw_mx):
        if raw_mx:  # (layer, expert, QuantExperts): the checkpoint's own MXFP4 bytes
            store.quant_expert(item[0], item[1]).copy_(item[2])
            seen += 1
            continue
        layer, expert, w13_DF2, w2_FD = item
        if layout.quant is not None:
            store.quant_expert(layer, expert).copy_(quantize_experts(w13_DF2[None], w2_FD[None], layout.quant,
                                                                     layout.group))
        else:
            store.w13(layer, expert).copy_(w13_DF2)
            store.w2(layer, expert).copy_(w2_FD)
        seen += 1
    if seen != layout.total_experts:
        raise ValueError(f"{path}: streamed {seen} experts, the config declares {layout.total_experts}")
    return model, run, tokenizer, store
