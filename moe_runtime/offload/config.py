"""OffloadConfig: every setting of the expert cache, validated once, shared by our engine
(ExpertCacheEngine) and the transformers integration (offload/transformers_cache.py).

    OffloadConfig(expert_fraction=0.25, policy="predictive", cpu_experts=True)
    OffloadConfig(gpu_expert_gib=20, device="cuda:0")
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from moe_runtime.kernels.quant import EXPERT_DTYPES, check_format
from moe_runtime.offload.cache import POLICIES, SlotPool
from moe_runtime.offload.store import ExpertLayout

PREDICTORS = ("auto", "none", "lookahead", "exact", "learned")
ENGINE_POLICIES = (*POLICIES, "default")
"""What OffloadConfig.policy accepts: `default` (the plan chosen per run, see `policy`) or one fixed scheme."""
DEFAULT_CALIBRATION_TOKENS = 64
"""The calibration window when a run's length is not known up front (`moe serve`, decode_batch)."""


@dataclass(kw_only=True)
class OffloadConfig:
    gpu_expert_slots: int | None = None
    """Device expert slots (experts held at once). Give exactly one of the three capacities."""
    gpu_expert_gib: float | None = None
    """Device memory for expert slots, in GiB."""
    expert_fraction: float | None = None
    """Slots as a fraction of all routed experts of the model (0.25: a quarter of them)."""
    policy: str = "default"
    """default | lru | lfu | predictive | mixtral-offloading | moe-infinity | fiddler |
    llama-cpp-n-cpu-moe | ktransformers | hybrid | hybrid-lru. default: the plan chosen per run, the
    one `moe trace simulate` and bench/cache_policies.py project (simulate.choose_policy): the first
    `calibration_tokens` decode steps run the adaptive planner (predictive) while their routing and
    predictions are recorded, then every candidate (predictive, each host-using peer, LRU, LFU) is
    replayed on that window with the engine's own calibration and the fastest serves the rest,
    primed with the window's profile. With a `profile` trace the choice is made up front on it."""
    calibration_tokens: int | None = None
    """policy=default: decode steps in the calibration window (>= 2). None: simulate.calibration_passes
    of the first generation's decode steps (half of them, the simulator's calibration part), or
    DEFAULT_CALIBRATION_TOKENS when the length is not known up front (`moe serve`)."""
    cpu_experts: bool | str = "auto"
    """Let the calibrated cost model run cold experts (or, in a split run, part of one) on host
    cores instead of copying them: True | False | auto (on when the slots are on a CUDA device,
    where the host cores are a second resource beside the link; off when the host is the device)."""
    device: str | torch.device | None = None
    """auto (None) | cpu | cuda | cuda:N: where the dense weights and the slots live."""
    predictor: Any = "auto"
    """auto | none | lookahead | exact, or a fitted offload.predictor.LearnedPredictor."""
    lookahead_depth: int = 1
    """Predict this many MoE layers past the next one."""
    stream_fraction: float = 0.75
    """Stream a whole layer when at least this fraction of its experts is used in one step."""
    max_inflight: int | None = None
    """Prefetch copies in flight at once (default 2 x top-k)."""
    record_trace: bool = False
    """Record routing (our engine only) for `moe trace` / the learned predictor."""
    profile: Any = None
    """Calibration routing for the hot-set policies (ktransformers, fiddler, hybrid, hybrid-lru) and
    the predictive policy's prior: a RoutingTrace of this model, or an [L, E] array of the share of
    passes that used each expert. None: the hot-set peers profile the first forward pass (the prompt)."""
    expert_dtype: str = "bf16"
    """How routed experts are stored, copied and held in slots: bf16 (as the model holds them, not
    quantised) | int8 (per channel) | int4 (group-wise) | mxfp4 (kernels/quant.py). Quantised on load
    unless the engine is given an already quantised store (`moe quantize`)."""
    expert_group: int | None = None
    """int4 group size along the reduction dim (32..128; default 64)."""

    def __post_init__(self) -> None:
        given = [n for n in ("gpu_expert_slots", "gpu_expert_gib", "expert_fraction") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of gpu_expert_slots (a number of experts), gpu_expert_gib (GiB) or "
                             f"expert_fraction (of all experts); got {', '.join(given) or 'none'}")
        if self.gpu_expert_slots is not None and self.gpu_expert_slots < 1:
            raise ValueError(f"gpu_expert_slots={self.gpu_expert_slots} must be >= 1")
        if self.gpu_expert_gib is not None and not self.gpu_expert_gib > 0:
            raise ValueError(f"gpu_expert_gib={self.gpu_expert_gib} must be > 0")
        if self.expert_fraction is not None and not 0 < self.expert_fraction <= 1:
            raise ValueError(f"expert_fraction={self.expert_fraction} must be in (0, 1]")
        if self.policy not in ENGINE_POLICIES:
            raise ValueError(f"policy={self.policy!r} is not one of {', '.join(ENGINE_POLICIES)}; pick one of those")
        if self.calibration_tokens is not None and (self.policy != "default" or self.calibration_tokens < 2):
            raise ValueError(f"calibration_tokens={self.calibration_tokens} applies to policy='default' only and must "
                             f"be >= 2 decode steps (the window is split once more to score the candidates)")
        if self.policy == "default" and self.profile is not None and not _is_trace(self.profile):
            raise ValueError("policy='default' with a profile chooses its plan by replaying the profile's routing: "
                             "pass a RoutingTrace of this model (moe generate --profile TRACE), not an array of shares")
        if isinstance(self.predictor, str) and self.predictor not in PREDICTORS:
            raise ValueError(f"predictor={self.predictor!r} is not one of {', '.join(PREDICTORS)} or a LearnedPredictor")
        if self.predictor == "learned":
            raise ValueError("predictor='learned' needs a trained model: pass LearnedPredictor.fit(trace) instead")
        if self.lookahead_depth < 0:
            raise ValueError(f"lookahead_depth={self.lookahead_depth} must be >= 0 (0: predict only the next MoE layer)")
        if not 0 < self.stream_fraction <= 1:
            raise ValueError(f"stream_fraction={self.stream_fraction} must be in (0, 1]")
        if self.max_inflight is not None and self.max_inflight < 1:
            raise ValueError(f"max_inflight={self.max_inflight} must be >= 1")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"expert_dtype={self.expert_dtype!r} is not one of {', '.join(EXPERT_DTYPES)}; pick one "
                             f"of those (bf16 keeps the experts as the model holds them)")
        if self.expert_group is not None:
            if self.expert_dtype != "int4":
                raise ValueError(f"expert_group={self.expert_group} applies to expert_dtype='int4' only "
                                 f"(int8 is per channel, mxfp4 has fixed blocks of 32)")
            check_format("int4", self.expert_group)
        if not isinstance(self.cpu_experts, bool) and self.cpu_experts != "auto":
            raise ValueError(f"cpu_experts={self.cpu_experts!r} must be True, False or 'auto'")

    def profile_trace(self):
        """The profile when it is a RoutingTrace (what policy=default chooses its plan on), else None."""
        return self.profile if _is_trace(self.profile) else None

    def profile_for(self, num_layers: int, num_experts: int):
        """The profile as an [L, E] array of shares (None if none was given)."""
        if self.profile is None:
            return None
        from moe_runtime.offload.trace import RoutingTrace
        if isinstance(self.profile, RoutingTrace):
            from moe_runtime.offload.simulate import profile_of, steps_of
            tr = self.profile
            if (tr.num_layers, tr.num_experts) != (num_layers, num_experts):
                raise ValueError(f"profile trace is for {tr.num_layers} layers x {tr.num_experts} experts; this model "
                                 f"has {num_layers} x {num_experts}: record it from this model")
            return profile_of(steps_of(tr), num_layers, num_experts)
        import numpy as np
        arr = np.asarray(self.profile, dtype=np.float64)
        if arr.shape != (num_layers, num_experts) or not np.all((arr >= 0) & (arr <= 1)):
            raise ValueError(f"profile must be a RoutingTrace or an array of shape ({num_layers}, {num_experts}) "
                             f"with shares in [0, 1]; got shape {arr.shape}")
        return arr

    def host_experts(self, device: torch.device) -> bool:
        """Whether the cost model may use host cores on this device (cpu_experts resolved)."""
        return device.type == "cuda" if self.cpu_experts == "auto" else bool(self.cpu_experts)

    def slots_for(self, layout: ExpertLayout) -> int:
        """Device slots for this model (never more than its experts)."""
        if self.gpu_expert_slots is not None:
            slots = self.gpu_expert_slots
        elif self.gpu_expert_gib is not None:
            slots = SlotPool.slots_for_gib(self.gpu_expert_gib, layout)
        else:
            slots = max(1, math.floor(self.expert_fraction * layout.total_experts))
        return min(slots, layout.total_experts)


def _is_trace(obj) -> bool:
    from moe_runtime.offload.trace import RoutingTrace
    return isinstance(obj, RoutingTrace)


CPU_EXPERTS_CHOICES = {"auto": "auto", "on": True, "off": False}


def add_cpu_experts_arg(p) -> None:
    """--cpu-experts [auto|on|off] for the CLIs (bare flag: on)."""
    p.add_argument("--cpu-experts", nargs="?", const="on", default="auto", choices=list(CPU_EXPERTS_CHOICES),
                   help="let the calibrated cost model run cold experts, or part of one while the rest is "
                        "copied, on host cores (auto: on with a CUDA device; a bare --cpu-experts is on)")


def add_expert_dtype_arg(p) -> None:
    """--expert-dtype / --expert-group for the CLIs."""
    p.add_argument("--expert-dtype", default="bf16", choices=list(EXPERT_DTYPES),
                   help="store, copy and hold routed experts quantised: int8 (per channel), int4 (group-wise), "
                        "mxfp4; bf16 keeps them as loaded (a checkpoint written by `moe quantize` is used as is)")
    p.add_argument("--expert-group", type=int, default=None, help="int4 group size (32..128, default 64)")


__all__ = ["OffloadConfig", "PREDICTORS", "ENGINE_POLICIES", "DEFAULT_CALIBRATION_TOKENS", "CPU_EXPERTS_CHOICES",
           "add_cpu_experts_arg", "add_expert_dtype_arg"]
