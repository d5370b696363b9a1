"""Expert-cache inference: experts in one host buffer, a fixed pool of device slots, predictive
prefetch during attention, cold experts on host cores. See offload/engine.py for the tour.

    from moe_runtime.offload import ExpertCacheEngine, OffloadConfig, SamplingParams
    engine = ExpertCacheEngine(model, OffloadConfig(gpu_expert_slots=16, policy="predictive", cpu_experts=True))
    result = engine.generate(prompt_BS, max_new_tokens=64)
    result = engine.generate([[1, 2, 3], [4]], params=SamplingParams(max_new_tokens=64, top_p=0.9, temperature=0.7,
                                                                     eos_token_ids=(2,), seed=0))
Generation controls and the step-wise DecodeBatch (continuous batching) are in core/generation.py.
A transformers MoE model: enable_expert_cache(model, OffloadConfig(...)) (offload/transformers_cache.py).
"""
from moe_runtime.offload.cache import ExpertCache, SlotPool
from moe_runtime.offload.config import OffloadConfig
from moe_runtime.core.generation import DecodeBatch, SamplingParams, TokenEvent
from moe_runtime.offload.engine import ExpertCacheEngine, GenerationResult
from moe_runtime.offload.predictor import LearnedPredictor, LookaheadPredictor, PredictionStats
from moe_runtime.offload.store import HostExpertStore
from moe_runtime.offload.trace import RoutingTrace, TraceError, TraceRecorder


def __getattr__(name: str):
    """The transformers integration imports transformers: only when asked for."""
    if name in ("enable_expert_cache", "load_with_expert_cache", "TransformersExpertCache"):
        from moe_runtime.offload import transformers_cache
        return getattr(transformers_cache, name)
    raise AttributeError(f"module 'moe_runtime.offload' has no attribute {name!r}")


__all__ = ["ExpertCacheEngine", "OffloadConfig", "enable_expert_cache", "load_with_expert_cache", "GenerationResult",
           "SamplingParams", "DecodeBatch", "TokenEvent", "HostExpertStore", "SlotPool", "ExpertCache",
           "LookaheadPredictor", "LearnedPredictor", "PredictionStats", "RoutingTrace", "TraceRecorder",
           "TraceError"]
