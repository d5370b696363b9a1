"""The expert cache inside a transformers MoE model: `model.generate()` unchanged, experts offloaded.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, m MoE layer index.

    from transformers import AutoModelForCausalLM
    from moe_runtime.offload import OffloadConfig, enable_expert_cache
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)        # on the host
    enable_expert_cache(model, OffloadConfig(gpu_expert_gib=20, policy="predictive", cpu_experts=True))
    out = model.generate(**tok(prompt, return_tensors="pt").to("cuda"), max_new_tokens=64)
    print(model.expert_cache.report())    # hit rate, bytes moved, stall, prefetch precision/recall

transformers 5.x dispatches every MoE layer's experts through `ALL_EXPERTS_FUNCTIONS[name]` with
(hidden_states_TD, top_k_index_TK, top_k_weights_TK); this module registers EXPERTS_IMPLEMENTATION
there and `enable_expert_cache` switches the model to it, so the model's router, shared experts,
attention, KV cache and all of generate() (stopping criteria, sampling, beam search, streamers,
chat templates) stay transformers'. What changes:
1. every routed expert moves into our HostExpertStore (pinned on CUDA; each layer's parameters are
   freed as soon as they are copied; quantised on the way with OffloadConfig(expert_dtype="int4"
   etc.)) and only the dense weights go to the device;
2. each experts call sorts its rows by expert (core.dispatch.LocalDispatcher) and runs the
   OffloadRuntime MoE step (slot cache, copy engine, host experts, streaming regime), then combines;
3. predictors attach to the model's own routers: before MoE decoder layer l (MoE layer m) runs,
   the gates of MoE layers m .. m+depth read the hidden state entering layer l through their own
   post-attention norm (lookahead), and the planner (offload/decision.py) issues what pays. These four families route after attention, so no
   router reads the block input and no exact prediction exists for them;
4. a forward pass that starts a new KV cache resets the statistics, so `model.expert_cache.report()`
   describes the last generate() call (its first pass is the prefill).
Works for Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE; other models are refused with the reason.
`from_pretrained(..., experts_implementation=EXPERTS_IMPLEMENTATION)` is accepted once this module
is imported; the experts still have to be handed to the cache with enable_expert_cache (a forward
before that raises and says so) - or use load_with_expert_cache(path, config) for both steps.
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn
try:
    from transformers.integrations.moe import ExpertsInterface
except ImportError as e:  # transformers 4.x dispatches experts inside each model class: nothing to plug into
    raise ImportError("the transformers expert cache needs transformers>=5 (integrations.moe.ExpertsInterface); "
                      "pip install -U 'transformers>=5'") from e

from moe_runtime.core.dispatch import LocalDispatcher
from moe_runtime.core.train import resolve_device
from moe_runtime.offload.cache import ExpertCache, SlotPool
from moe_runtime.offload.config import OffloadConfig
from moe_runtime.offload.cpu_experts import Calibration, CostModel
from moe_runtime.offload.quant_host import calibrate_store
from moe_runtime.offload.predictor import to_predictions
from moe_runtime.offload.copy_engines import make_copy_engine
from moe_runtime.offload.runtime import OffloadRuntime
from moe_runtime.offload.stats import CacheStats
from moe_runtime.offload.store import ExpertLayout, HostExpertStore

EXPERTS_IMPLEMENTATION = "moe_runtime_expert_cache"
FAMILIES = {"mixtral": "Mixtral", "qwen2_moe": "Qwen2-MoE", "qwen3_moe": "Qwen3-MoE", "olmoe": "OLMoE"}


def expert_cache_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """The registered experts function: hidden_states [T, D], top_k_index / top_k_weights [T, K] -> [T, D]."""
    link = getattr(self, "_expert_cache_link", None)
    if not link:
        raise RuntimeError(f"experts_implementation={EXPERTS_IMPLEMENTATION!r} is set but this model's experts were "
                           f"never handed to the cache; call moe_runtime.offload.enable_expert_cache(model, OffloadConfig(...)) "
                           f"after from_pretrained")
    cache, m = link[0]
    x_sorted_ND, counts_E, meta = cache.dispatcher.dispatch(hidden_states, top_k_index, top_k_weights)
    y_sorted_ND = cache.runtime.run_experts(m, x_sorted_ND, counts_E)
    return cache.dispatcher.combine(y_sorted_ND, meta).to(hidden_states.dtype)


ExpertsInterface.register(EXPERTS_IMPLEMENTATION, expert_cache_forward)


def moe_decoder_layers(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(all decoder layers, the MoE ones in order); ValueError naming why a model is not supported."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if kind not in FAMILIES:
        raise ValueError(f"model_type={kind!r} is not supported by the expert cache; supported: "
                         f"{', '.join(f'{v} ({k})' for k, v in FAMILIES.items())}")
    base = getattr(model, getattr(model, "base_model_prefix", "model"), model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .{model.base_model_prefix}.layers; "
                         f"pass the ForCausalLM model or its base model")
    moe = [l for l in layers if hasattr(getattr(l, "mlp", None), "experts") and hasattr(l.mlp, "gate")]
    if not moe:
        raise ValueError(f"{type(model).__name__} has no MoE layers (every decoder layer is dense)")
    return list(layers), moe


def _check_experts(model: nn.Module, experts: nn.Module) -> None:
    act = getattr(model.config, "hidden_act", None)
    shape = (getattr(experts, "has_gate", True), getattr(experts, "has_bias", False),
             getattr(experts, "is_transposed", False), getattr(experts, "has_post_expert_norm", False))
    if act != "silu" or shape != (True, False, False, False):
        raise ValueError(f"the expert cache runs SwiGLU experts ([gate; up] -> silu -> down, no bias); this model has "
                         f"hidden_act={act!r}, (gated, bias, transposed, post-norm)={shape}")
    if experts.gate_up_proj.is_meta:
        raise ValueError("the expert weights are on the meta device; load the model with its weights (on the host) "
                         "before enable_expert_cache")


class TransformersExpertCache:
    """The cache behind one transformers model (`model.expert_cache`): store, slots, runtime, stats.

    Set-up: 1. find the MoE layers and check the family, 2. move the experts into the host store
    (freeing each layer's parameters), 3. dense weights to the device, 4. slot pool, copy engine,
    calibration, runtime, 5. link each experts module and switch the experts implementation,
    6. hooks for predictions and statistics."""

    def __init__(self, model: nn.Module, config: OffloadConfig, calibration: Calibration | None = None):
        self.model, self.config = model, config
        self.layers, moe = moe_decoder_layers(model)
        self.device = resolve_device(config.device)
        self.policy, self.cpu_experts = config.policy, config.host_experts(self.device)
        scheme = "predictive" if config.policy == "default" else config.policy
        self.plan = {"policy": "default", "state": "fixed", "chosen": "predictive", "calibration_tok_s": {},
                     "reason": "the transformers integration runs the adaptive planner for policy='default' (its "
                               "calibration window and plan switch are our engine's: moe generate / ExpertCacheEngine)"} \
            if config.policy == "default" else None
        self._setup_predictor(config)
        self.store = self._build_store(moe)
        model.to(self.device)
        self.pool = SlotPool(config.slots_for(self.store.layout), self.store.layout, self.device)
        self.copies = make_copy_engine(self.store, self.pool)
        self.calibration = calibration or calibrate_store(self.store, self.pool, self.copies,
                                                          attn_probe=self._attn_probe(moe[0]))
        self.copies.copy_s = self.calibration.copy_s
        top_k = getattr(model.config, "num_experts_per_tok", 2)
        self.runtime = OffloadRuntime(self.store, self.pool, ExpertCache(self.pool.num_slots, scheme), self.copies,
                                      CostModel(self.calibration), cpu_experts=self.cpu_experts,
                                      stream_fraction=config.stream_fraction,
                                      max_inflight=config.max_inflight or 2 * top_k)
        self.dispatcher = LocalDispatcher(self.store.layout.num_experts)
        self.stats = CacheStats(self.runtime, self.copies)
        self.moe_layers = moe
        for m, layer in enumerate(moe):
            layer.mlp.experts._expert_cache_link = [(self, m)]  # a list: nn.Module must not adopt it
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        self._moe_of_layer = {self.layers.index(l): m for m, l in enumerate(moe)}
        self._pass_t0 = self._decode_t0 = 0.0
        self._hooks = self._install_hooks()
        self.stats.reset()

    # ---------------------------------------------------------------- set-up
    def _setup_predictor(self, config: OffloadConfig) -> None:
        pred = config.predictor
        if not isinstance(pred, str):
            raise ValueError("a LearnedPredictor is trained on our own model's routing traces; for transformers "
                             "models use predictor='lookahead' or 'none'")
        if pred == "exact":
            raise ValueError(f"predictor='exact' needs routers that read the block input; "
                             f"{', '.join(FAMILIES.values())} route after attention: use 'lookahead'")
        if pred == "auto":
            pred = "lookahead" if config.policy in ("predictive", "default") else "none"
        self.predictor_name, self.depth = pred, config.lookahead_depth

    def _attn_probe(self, layer: nn.Module):
        """One decode-shaped attention of a MoE decoder layer: the window a prefetch can hide in
        (the planner weighs copies against it, as it does for our own model)."""
        base = getattr(self.model, getattr(self.model, "base_model_prefix", "model"), self.model)
        dense = next(p for p in layer.self_attn.parameters())
        x = torch.zeros(1, 1, self.model.config.hidden_size, device=dense.device, dtype=dense.dtype)
        rotary = getattr(base, "rotary_emb", None)
        pos = rotary(x, torch.zeros(1, 1, dtype=torch.long, device=x.device)) if rotary is not None else None
        return lambda: layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=pos,
                                       attention_mask=None)

    @torch.no_grad()
    def _build_store(self, moe: list[nn.Module]) -> HostExpertStore:
        ex0 = moe[0].mlp.experts
        _check_experts(self.model, ex0)
        E, F2, D = ex0.gate_up_proj.shape
        fmt = self.config.expert_dtype
        layout = ExpertLayout(num_layers=len(moe), num_experts=E, d_model=D, d_expert=F2 // 2,
                              dtype=ex0.gate_up_proj.dtype, quant=None if fmt == "bf16" else fmt,
                              group=self.config.expert_group or 0)
        store = HostExpertStore(layout, pin=self.device.type == "cuda")
        for m, layer in enumerate(moe):
            ex = layer.mlp.experts
            _check_experts(self.model, ex)
            # transformers keeps [E, 2F, D] / [E, D, F] (out, in); the store keeps [E, D, 2F] / [E, F, D].
            store.load_layer(m, ex.gate_up_proj.transpose(1, 2), ex.down_proj.transpose(1, 2))
            del ex.gate_up_proj, ex.down_proj  # the store holds them now; never on the device
        return store

    def _install_hooks(self) -> list:
        hooks = [self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True),
                 self.model.register_forward_hook(self._on_forward_end)]
        for i, layer in enumerate(self.layers):
            if i in self._moe_of_layer:
                hooks.append(layer.register_forward_pre_hook(
                    lambda _m, args, kwargs, i=i: self._on_layer(i, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
        return hooks

    # ---------------------------------------------------------------- hooks
    def _on_forward(self, _mod, args, kwargs) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:  # a new KV cache: a new generation
            self.stats.reset()
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        self._rows, self._cols = ids.shape[0], ids.shape[1]
        self._sync()
        self._pass_t0 = time.perf_counter()

    @torch.no_grad()
    def _on_layer(self, i: int, h_BSD: torch.Tensor) -> None:
        """Before MoE decoder layer i (its attention): predictions for MoE layers m .. m+depth from
        their own gates on the hidden state entering layer i (lookahead), then one planner pass."""
        m = self._moe_of_layer[i]
        if self.runtime.resident[m]:
            return  # every expert of the layer sits in its slot: nothing to decide
        raw = []
        for d in range(self.depth + 1 if self.predictor_name == "lookahead" else 0):
            j = m + d
            if j >= len(self.moe_layers):
                break
            target = self.moe_layers[j]
            x_TD = target.post_attention_layernorm(h_BSD).reshape(-1, h_BSD.shape[-1])
            _, w_TK, idx_TK = target.mlp.gate.forward(x_TD)  # .forward: output recorders must not see it
            raw.append((j, d, idx_TK, w_TK))
        self.runtime.begin_layer(m, to_predictions(raw))

    def _on_forward_end(self, _mod, _args, _out) -> None:
        self.runtime.end_pass()
        self._sync()
        now, t = time.perf_counter(), self.stats.timing
        t.forward_passes += 1
        t.generated_tokens += self._rows
        if t.forward_passes == 1:
            t.batch, t.prompt_tokens, t.new_tokens = self._rows, self._cols, 1
            self.stats.mark_prefill(now - self._pass_t0)
            self._decode_t0 = now
        else:
            t.new_tokens += 1
            t.decode_tokens += self._rows
            t.decode_s = now - self._decode_t0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: timing boundaries only

    # ---------------------------------------------------------------- API
    def reset_stats(self) -> None:
        self.stats.reset()

    def report(self) -> dict[str, Any]:
        """The same report as ExpertCacheEngine.report() (offload/report.py) for the last generation."""
        from moe_runtime.offload.report import engine_report
        return engine_report(self)

    def close(self) -> None:
        """Remove the hooks and drain copies (the experts stay in the store; the model keeps using it)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.copies.synchronize()


def enable_expert_cache(model: nn.Module, config: OffloadConfig, *,
                        calibration: Calibration | None = None) -> TransformersExpertCache:
    """Hand a transformers MoE model's experts to the expert cache (see module docstring); also
    available afterwards as `model.expert_cache`. `calibration` reuses a measured one (else the
    copy, expert and attention times are measured now)."""
    if not isinstance(config, OffloadConfig):
        raise ValueError(f"config must be an OffloadConfig, got {type(config).__name__}")
    if getattr(model, "expert_cache", None) is not None:
        raise ValueError("this model already runs through an expert cache")
    if getattr(model, "hf_device_map", None):
        raise ValueError("this model was dispatched with a device_map (accelerate hooks place its experts); load it "
                         "without device_map, on the host, and let the cache place it (OffloadConfig.device)")
    cache = TransformersExpertCache(model, config, calibration)
    model.expert_cache = cache
    return cache


def load_with_expert_cache(path: str, config: OffloadConfig, **from_pretrained_kwargs) -> nn.Module:
    """AutoModelForCausalLM.from_pretrained on the host, then enable_expert_cache."""
    from transformers import AutoModelForCausalLM
    if "device_map" in from_pretrained_kwargs:
        raise ValueError("device_map places experts itself; leave it out (the cache puts the dense weights on "
                         "config.device and keeps the experts in host memory)")
    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation=EXPERTS_IMPLEMENTATION,
                                                 **from_pretrained_kwargs)
    enable_expert_cache(model, config)
    return model


__all__ = ["EXPERTS_IMPLEMENTATION", "FAMILIES", "TransformersExpertCache", "enable_expert_cache",
           "load_with_expert_cache", "expert_cache_forward", "moe_decoder_layers"]
