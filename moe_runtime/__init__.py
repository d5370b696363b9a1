"""moe-runtime: Mixture-of-Experts training and expert-offloading runtime.

One import root, four parts (dependencies point one way: kernels <- core <- cluster, offload):

    moe_runtime/core/      model math and the single-process product (no torch.distributed, no Ray)
    moe_runtime/kernels/   Triton kernels (grouped GEMM + fused SwiGLU, permutation) and references
    moe_runtime/cluster/   Ray Train job, collectives, expert-parallel training
    moe_runtime/offload/   expert-cache inference, traces and the simulator, `moe serve`

    from moe_runtime import Trainer, get_preset, load_model
    from moe_runtime.offload import ExpertCacheEngine, OffloadConfig, enable_expert_cache

The names below are resolved on first use, so `import moe_runtime.kernels` (or `.cluster`) does not
import the training loop.
"""
from __future__ import annotations

__version__ = "0.1.0"

_CORE = {
    "moe_runtime.core.checkpoint": ("Checkpoint", "CheckpointError", "latest_checkpoint"),
    "moe_runtime.core.config": ("MoEConfig", "ModelConfig", "RunConfig", "TrainConfig", "get_preset", "load_config",
                                "PRESETS"),
    "moe_runtime.core.data": ("Corpus", "load_corpus"),
    "moe_runtime.core.layer": ("MoELayer",),
    "moe_runtime.core.model": ("MoETransformer", "KVCache"),
    "moe_runtime.core.router": ("TopKRouter", "BalanceTracker"),
    "moe_runtime.core.train": ("Trainer", "load_model"),
}
_WHERE = {name: module for module, names in _CORE.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:  # AttributeError lets `from moe_runtime import kernels` import the subpackage
        raise AttributeError(f"module 'moe_runtime' has no attribute {name!r}")
    from importlib import import_module
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
