"""gpt-oss (GptOssForCausalLM): config.json fields, and its expert tensors in our layout.

Legend: E experts, D model dim, F expert hidden dim, H query heads.

How gpt-oss differs from the other families, and where each difference lives:
    attention   q/k/v AND o biases (attention_bias)          ModelConfig.qkv_bias, o_bias
                per-head sink logits (self_attn.sinks)         ModelConfig.attn_sinks
                sliding window on layers of layer_types        ModelConfig.sliding_window, window_layers
                YaRN RoPE (rope_scaling / rope_parameters)     ModelConfig.rope_yarn_*
    router      logits with a bias; top-k of the logits, then  MoEConfig.router_bias; softmax +
                softmax over the K kept                        norm_topk_prob (the same weights)
    experts     biases on both matmuls; clamped SwiGLU with    MoEConfig.expert_bias, expert_act=
                alpha (1.702) and limit (7.0), (up + 1) * glu  'clamped_swiglu', swiglu_alpha/limit
                gate/up INTERLEAVED along 2F (gate = ::2)       de-interleaved on load to [gate | up]
    weights     fused gate_up_proj [E, D, 2F], down_proj [E, F, D] (float), or MXFP4
                *_blocks [E, O, K/32, 16] uint8 + *_scales [E, O, K/32] uint8 (real checkpoints),
                which is kernels/quant.py's mxfp4 layout row for row: loaded as it is into an mxfp4
                expert store, or dequantised exactly as transformers does (integrations/mxfp4.py).
Refused with the field named: other rope types, attention_factor / mscale overrides, partial
rotary, layer_types that are not all-sliding or alternating, a quantization_config that is not mxfp4.
"""
from __future__ import annotations

from typing import Any

import torch

from moe_runtime.core.config import MoEConfig, ModelConfig
from moe_runtime.core.hf.errors import HFCheckpointError
from moe_runtime.kernels import quant as kq

_YARN_KEYS = {"rope_type", "type", "factor", "beta_fast", "beta_slow", "original_max_position_embeddings",
              "truncate", "rope_theta", "partial_rotary_factor", "attention_factor", "mscale", "mscale_all_dim"}


def _error(f, msg: str):
    return HFCheckpointError(f"{f.file}: {msg}")


def yarn_fields(f, max_pos: int, default_theta: float) -> dict[str, Any]:
    """ModelConfig RoPE kwargs from rope_scaling (older files) or rope_parameters: plain or YaRN."""
    scaling, params = f.get("rope_scaling", None, dict), f.get("rope_parameters", None, dict)
    key, rp = ("rope_scaling", scaling) if scaling else ("rope_parameters", params or {})
    theta = float(rp.get("rope_theta", f.get("rope_theta", default_theta, float)))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    unknown = sorted(set(rp) - _YARN_KEYS)
    if rope_type not in ("default", "yarn") or unknown or any(isinstance(v, dict) for v in rp.values()):
        raise _error(f, f"field {key}={rp!r} is not supported: gpt-oss loads plain or YaRN RoPE with the "
                        f"keys {sorted(_YARN_KEYS)}")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise _error(f, f"field {key}.partial_rotary_factor={rp['partial_rotary_factor']} is not supported: "
                        f"MoETransformer rotates the whole head")
    for k in ("attention_factor", "mscale", "mscale_all_dim"):
        if rp.get(k) is not None:
            raise _error(f, f"field {key}.{k}={rp[k]!r} is not supported: only YaRN's default attention factor "
                            f"0.1 * ln(factor) + 1 is implemented")
    if rope_type == "default":
        return dict(rope_theta=theta)
    original = rp.get("original_max_position_embeddings")
    if not isinstance(original, int) or original < 1:
        raise _error(f, f"field {key}.original_max_position_embeddings={original!r} must be a positive int")
    factor = rp.get("factor")
    factor = float(max_pos / original if factor is None else factor)  # transformers' fallback
    return dict(rope_theta=theta, rope_yarn_factor=factor, rope_yarn_original_max=original,
                rope_yarn_beta_fast=float(rp.get("beta_fast") or 32), rope_yarn_beta_slow=float(rp.get("beta_slow") or 1),
                rope_yarn_truncate=bool(rp.get("truncate", True)))


def window_fields(f, n_layers: int) -> dict[str, Any]:
    """sliding_window / window_layers from layer_types (transformers' default: sliding on even layers)."""
    types = f.get("layer_types", None, list)
    if types is None:
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers or any(t not in ("sliding_attention", "full_attention") for t in types):
        raise _error(f, f"field layer_types={types!r} must list 'sliding_attention' / 'full_attention' for each of "
                        f"the {n_layers} layers")
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    window = f.get("sliding_window", None, int)
    if not sliding:
        return dict(sliding_window=None)
    patterns = {"all": list(range(n_layers)), "even": list(range(0, n_layers, 2)), "odd": list(range(1, n_layers, 2))}
    pattern = next((name for name, layers in patterns.items() if layers == sliding), None)
    if pattern is None:
        raise _error(f, f"field layer_types slides on layers {sliding}; only all layers, the even ones or the odd "
                        f"ones (gpt-oss alternates, starting with sliding) are supported")
    if window is None or window < 1:
        raise _error(f, f"field sliding_window={window!r} must be a positive int when layer_types has sliding layers")
    return dict(sliding_window=window, window_layers=pattern)


def _check_quantization(f) -> None:
    q = f.get("quantization_config", None, dict)
    if q is None:
        return
    if q.get("quant_method") != "mxfp4" or set(q) - {"quant_method", "modules_to_not_convert", "dequantize"}:
        raise _error(f, f"field quantization_config={q!r} is not supported: gpt-oss loads float or MXFP4 "
                        f"(quant_method 'mxfp4') experts")


def gpt_oss_config(f, kw: dict[str, Any], top_k: int, moe_kw: dict[str, Any]) -> ModelConfig:
    """ModelConfig of a GptOssForCausalLM config.json (attention kwargs `kw` already read)."""
    per_token = f.get("experts_per_token", None, int)  # the original release's name; transformers ignores it
    if per_token is not None and per_token != top_k:
        raise _error(f, f"fields experts_per_token={per_token} and num_experts_per_tok={top_k} disagree; keep one")
    f.get("initial_context_length", None, int)  # informational (YaRN reads original_max_position_embeddings)
    _check_quantization(f)
    bias = f.get("attention_bias", True, bool)
    moe = MoEConfig(num_experts=f.alias(("num_local_experts", "num_experts")), d_expert=f.get("intermediate_size", kind=int),
                    router_bias=True, expert_bias=True, expert_act="clamped_swiglu",
                    swiglu_alpha=f.get("swiglu_alpha", 1.702, float), swiglu_limit=f.get("swiglu_limit", 7.0, float),
                    **moe_kw)
    return ModelConfig(moe=moe, qkv_bias=bias, o_bias=bias, attn_sinks=True, **window_fields(f, kw["n_layers"]), **kw)


# ---------------------------------------------------------------- expert tensors
def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """gpt-oss' [g0, u0, g1, u1, ...] along `dim` -> our [gate | up]."""
    n = t.shape[dim]
    gate, up = torch.arange(0, n, 2, device=t.device), torch.arange(1, n, 2, device=t.device)
    return torch.cat([t.index_select(dim, gate), t.index_select(dim, up)], dim=dim)


def mx_weight(blocks: torch.Tensor, scales: torch.Tensor) -> kq.QWeight:
    """A kernels.quant mxfp4 QWeight from gpt-oss blocks [n, O, K/32, 16] and scales [n, O, K/32]."""
    n, O, G, B = blocks.shape
    return kq.QWeight("mxfp4", kq.MX_BLOCK, G * B * 2, O, {"q": blocks.reshape(n, O, G * B).contiguous(),
                                                          "scale": scales.contiguous()})


def dequantize_mx(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, K, O] float weights, the values transformers' convert_moe_packed_tensors makes."""
    return mx_weight(blocks, scales).dequantize(dtype)


def mx_experts(gu_blocks, gu_scales, down_blocks, down_scales) -> kq.QuantExperts:
    """Quantised experts in our layout from gpt-oss' MXFP4 tensors, bytes unchanged: the gate_up rows
    (output channels) are de-interleaved to [gate | up]; down is already [D rows, F/2 bytes]."""
    w13 = mx_weight(deinterleave(gu_blocks, 1), deinterleave(gu_scales, 1))
    return kq.QuantExperts(w13, mx_weight(down_blocks, down_scales))


__all__ = ["yarn_fields", "window_fields", "gpt_oss_config", "deinterleave", "mx_weight", "dequantize_mx",
           "mx_experts"]
