"""Where a model computes: device names and mixed precision (used by training, eval and offload)."""
from __future__ import annotations

import contextlib

import torch


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' or None: CUDA when available, else the CPU; anything else must exist here."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available here; use --device cpu")
    return dev


def autocast_ctx(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when enabled; a no-op context elsewhere."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


__all__ = ["resolve_device", "autocast_ctx"]
