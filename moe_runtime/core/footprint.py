"""What a config needs in memory before anything is built, and the one-line refusal when it cannot fit.

Legend: P parameters this process holds, T tokens of one micro-batch on this process, L layers,
D model dim, F expert hidden dim, E experts, K top-k, H / Hk query / key-value heads, Dh head dim,
V vocab, S max_seq_len.

The estimate is a lower bound of what training (or loading for inference) cannot do without, so a
refusal is never wrong and a config it passes may still be tight:
- weights 4 bytes per parameter (fp32 master weights), and for training gradients (4) and AdamW's two
  moments (8): 16 bytes per parameter;
- activations kept for backward, per token of one micro-batch: per layer the attention inputs and
  outputs (D + 4 H Dh + 2 Hk Dh values), the routed experts' inputs, hidden states and outputs
  (K (2 D + 3 F)), the shared / dense MLP's hidden states, the router's E logits; then the V logits
  (fp32, twice: logits and the cross-entropy's softmax). Activation checkpointing keeps one layer's
  worth plus each layer's input ('full') or drops the attention part ('selective');
- rotary tables: built in float64 then kept in float32, 12 S Dh bytes at their peak.

Python integers throughout, so a size like d_expert = 2**70 is an honest (huge) number, never an
overflow. `check_fits` compares the total with the memory the device has available (Linux:
MemAvailable, capped by a cgroup limit; CUDA: free device memory) and raises ConfigError naming
what is needed, what there is, and which key to lower. It runs where a model is built (Trainer,
load_model); presets and projections that only read shapes never call it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from moe_runtime.core.config import ConfigError, RunConfig, param_count


def _gib(n: int | float) -> str:
    for unit, size in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 2**70 else f"{n / 2**60:.3g} EiB"
    return f"{n / 2**10:.3g} KiB"


def estimate(run: RunConfig, *, training: bool = True, world: int = 1, expert_share: float = 1.0,
             activation_bytes: int = 4) -> dict[str, int]:
    """Bytes this process needs, by part: weights (+ gradients and AdamW when training), activations
    (training only), rotary tables. world: data-parallel ranks sharing the batch; expert_share: the
    fraction of each layer's experts this process holds (1/EP)."""
    m, moe, t = run.model, run.model.moe, run.train
    counts = param_count(m)
    held = counts["total"] - counts["experts"] + int(counts["experts"] * expert_share)
    parts = {"weights": held * (16 if training else 4), "expert_params": counts["experts"],
             "embedding_params": m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2),
             "rotary": 12 * m.max_seq_len * m.head_dim, "activations": 0}
    if training:
        T = max(1, t.batch_size // max(1, world)) * t.seq_len
        attn = m.d_model + 4 * m.n_heads * m.head_dim + 2 * m.n_kv_heads * m.head_dim
        ffn_moe = 2 * m.d_model + moe.top_k * (2 * m.d_model + 3 * moe.d_expert) + 3 * moe.d_shared_expert \
            + moe.num_experts
        ffn_dense = m.d_model + 3 * m.d_dense_ffn
        layers = [attn + (ffn_moe if m.is_moe_layer(i) else ffn_dense) for i in range(m.n_layers)]
        if t.activation_checkpointing == "full":
            kept = m.n_layers * m.d_model + max(layers)
        elif t.activation_checkpointing == "selective":
            kept = sum(layers) - m.n_layers * (attn - m.d_model)
        else:
            kept = sum(layers)
        parts["activations"] = T * (kept * activation_bytes + 2 * 4 * m.vocab_size)
    parts["total"] = parts["weights"] + parts["activations"] + parts["rotary"]
    return parts


def available_bytes(device: torch.device) -> tuple[int | None, str]:
    """(bytes this process can still allocate on device, what that number is); None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory on {device}"
    have, what = None, "available memory on this machine"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                have, what = int(line.split()[1]) * 1024, "available memory on this machine (MemAvailable)"
    except OSError:
        pass
    if have is None:
        try:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            what = "physical memory on this machine"
        except (ValueError, OSError, AttributeError):
            return None, what
    try:  # a container's cgroup v2 limit is what this process can really have
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max" and int(limit) - used < have:
            have, what = max(0, int(limit) - used), "memory left under this container's cgroup limit"
    except (OSError, ValueError):
        pass
    return have, what


def _what_to_lower(run: RunConfig, parts: dict[str, int]) -> str:
    """The keys that shrink the biggest part."""
    biggest = max(("weights", "activations", "rotary"), key=lambda k: parts[k])
    if biggest == "rotary":
        return "model.max_seq_len"
    if biggest == "activations":
        return ("train.batch_size (--batch-size) or train.seq_len (--seq-len), or set "
                "train.activation_checkpointing (--activation-checkpointing full)")
    params = param_count(run.model)["total"]
    if parts["expert_params"] * 2 >= params:
        return "model.moe.d_expert or model.moe.num_experts"
    if parts["embedding_params"] * 2 >= params:
        return "model.vocab_size or model.d_model"
    return "model.d_model or model.n_layers"


def check_fits(run: RunConfig, device: torch.device, *, training: bool = True, world: int = 1,
               expert_share: float = 1.0, available: tuple[int | None, str] | None = None) -> dict[str, int]:
    """Refuse (ConfigError, one line) a config whose estimate exceeds what `device` has available;
    returns the estimate otherwise. `available`: (bytes, description) instead of asking the system."""
    act = 2 if device.type == "cuda" and run.train.autocast_bf16 else 4
    parts = estimate(run, training=training, world=world, expert_share=expert_share, activation_bytes=act)
    have, what = available if available is not None else available_bytes(device)
    if have is None or parts["total"] <= have:
        return parts
    detail = [f"weights{' + gradients + AdamW' if training else ''} {_gib(parts['weights'])}"]
    if training:
        detail.append(f"activations {_gib(parts['activations'])}")
    detail.append(f"rotary tables {_gib(parts['rotary'])}")
    raise ConfigError(f"{run.name}: {'training' if training else 'loading'} this model needs at least "
                      f"{_gib(parts['total'])} on {device.type} ({', '.join(detail)}), but the {what} is "
                      f"{_gib(have)}; lower {_what_to_lower(run, parts)}")


__all__ = ["estimate", "available_bytes", "check_fits"]
