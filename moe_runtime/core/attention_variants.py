"""Attention and RoPE variants some checkpoints need (gpt-oss): sliding windows, sinks, YaRN.

Legend: B batch, H heads, S new tokens (queries), K keys (cache slots read), Dh head dim.

Every variant is off by default (ModelConfig.sliding_window / attn_sinks / rope_yarn_factor), and
then core.model runs exactly as before. They follow transformers' gpt-oss:
- sliding window W (masking_utils.sliding_window_overlay): the query at slot q sees keys at slots
  q - W < k <= q, itself included. Slots are cache positions (left padding counts, as in
  transformers' cache_position). The KV cache keeps every slot (no ring buffer).
- sinks (modeling_gpt_oss.eager_attention_forward): one learned logit s_h per head joins every
  softmax's denominator, p = exp(a_k) / (sum_j exp(a_j) + exp(s_h)), and carries no value. We keep
  SDPA by appending one key of zeros and value of zeros whose additive mask is s_h: its score is
  q . 0 * scale + s_h = s_h, its value adds nothing.
- YaRN (modeling_rope_utils._compute_yarn_parameters): inv_freq blends interpolated and
  extrapolated frequencies by a linear ramp over the correction range, and cos/sin are multiplied
  by the attention factor 0.1 * ln(factor) + 1, computed in float32 like transformers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from moe_runtime.core.config import ModelConfig


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq [Dh/2] float32, attention factor) exactly as transformers' YaRN computes them."""
    dim, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_yarn_factor
    original = cfg.rope_yarn_original_max
    attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_yarn_beta_fast), correction_dim(cfg.rope_yarn_beta_slow)
    if cfg.rope_yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def model_rotary_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, Dh/2] float32 for this model: plain RoPE, or YaRN when configured."""
    if cfg.rope_yarn_factor is None:
        return rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    inv_freq, scale = yarn_inv_freq(cfg)
    angles = torch.arange(cfg.max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos() * scale, angles.sin() * scale


def variant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      q_slots: int | torch.Tensor, causal: bool, window: int | None,
                      sinks_H: torch.Tensor | None) -> torch.Tensor:
    """SDPA with a sliding window and/or sinks. q [B, H, S, Dh]; k, v [B, H, K, Dh] (GQA repeated,
    key k at cache slot k); mask: bool (True: visible) or additive (0 / -inf), broadcastable to
    [B, 1, S, K] (None: every key visible);
    q_slots: the first query's slot (int, queries consecutive) or [B, S] slots; causal: also hide
    keys after the query. Returns [B, H, S, Dh]."""
    B, H, S, _ = q.shape
    K = k.shape[2]
    dev = q.device
    if isinstance(q_slots, int):
        slots = (q_slots + torch.arange(S, device=dev))[None, None, :, None]
    else:
        slots = q_slots.to(dev)[:, None, :, None]
    keys = torch.arange(K, device=dev)[None, None, None, :]
    if mask is None:
        visible = torch.ones(1, 1, S, K, dtype=torch.bool, device=dev)
    else:  # a bool mask (True: visible) or the model's additive one (0: visible, -inf: hidden)
        visible = mask if mask.dtype == torch.bool else mask == 0
    if causal:
        visible = visible & (keys <= slots)
    if window is not None:
        visible = visible & (keys > slots - window)
    if sinks_H is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    add = torch.zeros((), dtype=q.dtype, device=dev).masked_fill(~visible, float("-inf"))
    add = add.expand(B, H, S, K)
    sink = sinks_H.to(q.dtype).view(1, H, 1, 1).expand(B, H, S, 1)
    zeros = k.new_zeros(B, H, 1, k.shape[-1])
    return F.scaled_dot_product_attention(q, torch.cat([k, zeros], 2), torch.cat([v, zeros], 2),
                                          attn_mask=torch.cat([add, sink], dim=-1))


__all__ = ["rotary_tables", "yarn_inv_freq", "model_rotary_tables", "variant_attention"]
