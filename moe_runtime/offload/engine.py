"""ExpertCacheEngine: generation with every routed expert in host memory and a device slot cache.

Legend: B batch, S sequence, V vocab, L MoE layers, E experts, m MoE layer index.

    engine = ExpertCacheEngine(model, OffloadConfig(gpu_expert_slots=16, policy="predictive", cpu_experts=True))
    result = engine.generate(prompt_BS, max_new_tokens=64)     # tokens, report (JSON-able)

The model's own math runs unchanged: each MoE layer's ExpertBank is swapped for a CachedExperts
module with the same forward(x_sorted, counts) signature, and forward hooks do the rest:
1. before MoE block b runs (before its attention): the predictor names the experts of MoE layers
   m .. m+depth and the planner (offload/decision.py) issues the copies that pay for their link time;
2. a pre-attention router's output (exact mode) is queued the moment it exists, still before
   attention; every router's output also feeds the learned predictor's memory and the trace;
3. the MoE step (runtime.run_experts) runs the planner's plan: hits, waits, misses, host experts,
   streams; with every expert in a slot, the resident path (no per-layer hooks at all);
4. at the end of a forward pass predictions lapse and stall timers are collected.
Without CUDA the host is the "device" and every path above runs the same way.

policy="default" (the default) is the plan the simulator projects (simulate.simulate_default): the
first `calibration_tokens` decode steps run the adaptive planner (predictive) while a recorder keeps
their routing and the predictions the engine submitted; before the next forward pass
simulate.choose_policy replays every candidate (predictive, each host-using peer, LRU, LFU) on that
window with this engine's calibration, lookahead depth, prefetch limit and host-core setting, and
the runtime switches to a fresh planner of the fastest, primed with the window's profile (its warm
or pinned set copied in at once). With a profile trace (OffloadConfig.profile) the plan is chosen
on it before the first step. `engine.plan` (and report()["plan"]) says what was chosen and why.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from moe_runtime.core.generation import DecodeBatch, SamplingParams, SequenceOutput, TokenEvent
from moe_runtime.core.model import KVCache, MoETransformer
from moe_runtime.core.train import resolve_device
from moe_runtime.offload.cache import ExpertCache, SlotPool
from moe_runtime.offload.config import DEFAULT_CALIBRATION_TOKENS, PREDICTORS, OffloadConfig
from moe_runtime.offload.cpu_experts import Calibration, CostModel
from moe_runtime.offload.quant_host import calibrate_store
from moe_runtime.offload.predictor import ExactPredictor, LearnedPredictor, LookaheadPredictor, moe_block_index, to_predictions
from moe_runtime.offload.copy_engines import make_copy_engine
from moe_runtime.offload.runtime import CachedExperts, OffloadRuntime
from moe_runtime.offload.stats import CacheStats
from moe_runtime.offload.store import HostExpertStore
from moe_runtime.offload.report import engine_report
from moe_runtime.offload.trace import RoutingTrace, TraceRecorder, recorder_for


@dataclass
class GenerationResult:
    tokens: torch.Tensor
    """[B, new] generated token ids (host); -1 after a sequence stopped."""
    logits: torch.Tensor | None
    """[new, B, V] float32 logits each token was drawn from (return_logits=True), host; NaN rows
    for sequences already stopped."""
    report: dict[str, Any]
    sequences: list[SequenceOutput] = field(default_factory=list)
    """Per prompt: tokens, text (with decode=), finish_reason ('stop' | 'length'), stop_reason."""


class ExpertCacheEngine:
    """See module docstring. Settings come in an OffloadConfig (or, as before, as its keyword
    arguments: gpu_expert_slots=..., policy=...). `store` reuses an existing HostExpertStore of this model's experts;
    `keep_banks=True` keeps the original ExpertBanks so `close()` can put them back.

    Set-up: 1. validate arguments and the predictor, 2. copy experts into the host store (or
    reuse one), 3. allocate the slot pool and copy engine, 4. swap each ExpertBank for a
    CachedExperts and move the dense weights to the device, 5. calibrate the cost model,
    6. build the runtime, 7. install the hooks."""

    def __init__(self, model: MoETransformer, config: OffloadConfig | None = None, *,
                 calibration: Calibration | None = None, store: HostExpertStore | None = None,
                 keep_banks: bool = False, **settings):
        if config is None:
            config = OffloadConfig(**settings)  # the old keyword form: gpu_expert_slots=..., policy=...
        elif settings:
            raise ValueError(f"give settings in the OffloadConfig or as keywords, not both (got {sorted(settings)})")
        self.config = config
        self.model, self.policy = model.eval(), config.policy
        self.device = resolve_device(config.device)
        self.cpu_experts = config.host_experts(self.device)
        self.moe_blocks, self.first_moe = moe_block_index(model)
        self._setup_predictor(config.predictor, config.lookahead_depth)  # validate before touching the model
        layers = [b.ffn for b in self.moe_blocks]
        self._banks = [l.experts for l in layers] if keep_banks else None
        if store is None:
            store = HostExpertStore.from_banks([l.experts for l in layers], pin=self.device.type == "cuda",
                                               expert_dtype=config.expert_dtype, group=config.expert_group)
        elif config.expert_dtype != "bf16" and store.layout.expert_dtype != config.expert_dtype:
            raise ValueError(f"expert_dtype={config.expert_dtype!r} but the given store holds "
                             f"{store.layout.expert_dtype} experts; pass a store of that format or leave expert_dtype")
        self.store = store
        lay, cfg = store.layout, model.cfg
        have = (lay.num_layers, lay.num_experts, lay.d_model, lay.d_expert)
        want = (len(layers), cfg.moe.num_experts, cfg.d_model, cfg.moe.d_expert)
        if have != want:
            raise ValueError(f"store holds (layers, experts, d_model, d_expert)={have} but the model has {want}; "
                             f"pass the store built from this model's experts, or none")
        slots = config.slots_for(lay)
        self.pool = SlotPool(slots, lay, self.device)
        self.copies = make_copy_engine(store, self.pool)
        for m, layer in enumerate(layers):  # experts stay in the store; only dense weights move
            layer.experts = CachedExperts(lay, m, layer.experts)
        model.to(self.device)
        self.calibration = calibration or calibrate_store(store, self.pool, self.copies, attn_probe=self._attn_probe())
        self.copies.copy_s = self.calibration.copy_s
        self.max_inflight = config.max_inflight or 2 * model.cfg.moe.top_k
        meta = {"source": "generate", "expert_bytes": lay.expert_bytes, "calibration": self.calibration.to_dict()}
        scheme, profile, cpu = config.policy, config.profile_for(len(layers), cfg.moe.num_experts), self.cpu_experts
        self.plan: dict[str, Any] | None = None
        """policy=default: what the engine runs and why (state calibrating | chosen | resident)."""
        self._window: TraceRecorder | None = None
        self._window_passes, self._window_len = 0, config.calibration_tokens
        if config.policy == "default":
            scheme, profile, cpu = self._default_plan(slots, lay, meta)
        self.runtime = OffloadRuntime(store, self.pool, ExpertCache(self.pool.num_slots, scheme), self.copies,
                                      CostModel(self.calibration), cpu_experts=cpu,
                                      stream_fraction=config.stream_fraction, max_inflight=self.max_inflight,
                                      profile=profile)
        for layer in layers:
            layer.experts.bind(self.runtime)
        if self.learned is not None:
            self.learned.to(self.device)
        self.recorder = recorder_for(model, meta=meta) if config.record_trace else None
        self._cur: dict[int, torch.Tensor] = {}
        self._prev: dict[int, torch.Tensor] = {}
        self._BS = (0, 0)
        self._moe_of_block = {blk.layer: m for m, blk in enumerate(self.moe_blocks)}
        self._hooks = self._install_hooks()
        self.stats = CacheStats(self.runtime, self.copies)
        self.reset_stats()

    # ---------------------------------------------------------------- policy=default
    def _replay_predictor(self, trace: RoutingTrace | None) -> str:
        """What choose_policy replays for the adaptive candidate: this engine's learned predictor, or
        the lookahead predictions recorded with the routing (the engine's own, or none)."""
        if self.learned is not None or (trace is not None and trace.lookahead is None):
            return "learned"
        return "recorded"

    def _choose(self, trace: RoutingTrace, where: str) -> tuple[str, np.ndarray]:
        """simulate.choose_policy on `trace` with this engine's constants; fills self.plan."""
        from moe_runtime.offload.simulate import choose_policy, plan_reason, profile_of, steps_of
        predictor = self._replay_predictor(trace)
        learned = self.learned
        chosen, scores = choose_policy(trace, self.pool.num_slots, self.calibration, predictor=predictor,
                                       depth=self.depth, cpu_experts=self.cpu_experts,
                                       stream_fraction=self.config.stream_fraction, max_inflight=self.max_inflight,
                                       fit=(lambda _t: learned) if learned is not None else None)
        self.plan.update(state="chosen", chosen=chosen, calibration_tok_s=scores, replayed_predictor=predictor,
                         reason=plan_reason(chosen, scores, where))
        return chosen, profile_of(steps_of(trace), trace.num_layers, trace.num_experts)

    def _default_plan(self, slots: int, lay, meta: dict) -> tuple[str, Any, bool]:
        """policy=default at set-up: (scheme, profile, host cores) to start with. Every expert fits:
        nothing to choose. A profile trace: chosen on it now. Else the calibration window, recorded."""
        self.plan = {"policy": "default", "state": "calibrating", "chosen": None, "calibration_tok_s": {},
                     "calibration_tokens": self._window_len, "switch_copies": 0, "reason": None}
        if slots >= lay.total_experts:
            self.plan.update(state="resident", chosen="predictive",
                             reason="every expert fits in the slots: all resident, no plan to choose")
            return "predictive", None, self.cpu_experts
        trace = self.config.profile_trace()
        if trace is not None:
            if (trace.num_layers, trace.num_experts) != (lay.num_layers, lay.num_experts):
                raise ValueError(f"profile trace is for {trace.num_layers} layers x {trace.num_experts} experts; this "
                                 f"model has {lay.num_layers} x {lay.num_experts}: record it from this model")
            chosen, profile = self._choose(trace, "the profile trace's second half")
            self.plan["calibration_tokens"] = None
            self._predicting = chosen == "predictive"
            return chosen, profile, self.cpu_experts and chosen == "predictive"
        self._window = recorder_for(self.model, meta={**meta, "source": "calibration window"})
        if self.learned is None:  # what the engine submits is recorded as the lookahead column
            self._window.look_depth = self.depth
            self._window.meta["lookahead_depth"] = self.depth
        return "predictive", None, self.cpu_experts

    def _switch(self) -> None:
        """The window is complete: choose on it, then a fresh planner of the choice (module docstring)."""
        trace, self._window = self._window.to_trace(), None
        K = self._window_passes
        chosen, profile = self._choose(trace, f"the second half of the first {K} decode steps")
        before = self.stats.snapshot()
        n = self.runtime.replan(chosen, profile=profile, cpu_experts=self.cpu_experts and chosen == "predictive")
        for m, blk in enumerate(self.moe_blocks):
            blk.ffn.experts.bind(self.runtime)
        self.stats.runtime = self.runtime
        self.plan.update(calibration_tokens=K, switch_copies=n,
                         window={**before.counters.as_dict(), "bytes_moved": before.bytes_moved})
        self._predicting = chosen == "predictive"

    def _window_pass_done(self) -> None:
        """After a forward pass: one more decode step in the window (S == 1, as split_trace counts)."""
        if self._BS[1] == 1:
            self._window_passes += 1

    # ---------------------------------------------------------------- set-up
    def _attn_probe(self):
        """Times one decode-shaped attention block (the window a prefetch can hide in)."""
        blk, D = self.moe_blocks[0], self.model.cfg.d_model
        x = torch.zeros(1, 1, D, device=self.device, dtype=self.model.embed.weight.dtype)
        cos, sin = self.model.rope_cos[:1], self.model.rope_sin[:1]
        return lambda: blk.attn(blk.attn_norm(x), cos, sin)

    def _setup_predictor(self, predictor, depth: int) -> None:
        self.lookahead = self.exact = self.learned = None
        pre = self.model.cfg.moe.router_position == "pre_attention"
        if isinstance(predictor, LearnedPredictor):
            L, E = len(self.moe_blocks), self.model.cfg.moe.num_experts
            if predictor.L != L or predictor.E != E:
                raise ValueError(f"learned predictor is for L={predictor.L}, E={predictor.E}; this model has "
                                 f"L={L}, E={E}; fit it on a trace of this model")
            self.learned, self.predictor_name, self._predicting = predictor, "learned", True
            self.depth = min(depth, predictor.depth)
            return
        self._predicting = True
        """Submit predictions to the planner (policy=default: off once a plan that never prefetches serves)."""
        if predictor == "auto":
            predicts = self.policy in ("predictive", "mixtral-offloading", "default")
            predictor = ("exact" if pre else "lookahead") if predicts else "none"
        self.predictor_name, self.depth = predictor, depth
        if predictor == "exact":
            self.exact = ExactPredictor(self.model)
            if depth > 0:
                self.lookahead = LookaheadPredictor(self.model, depth, skip_distance0=True)
        elif predictor == "lookahead":
            self.lookahead = LookaheadPredictor(self.model, depth)

    def _install_hooks(self) -> list:
        hooks = [self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True),
                 self.model.register_forward_hook(self._on_forward_end)]
        if self.runtime.all_resident and self.recorder is None and self._window is None:
            return hooks  # every expert sits in its slot: nothing to predict or decide per layer
        for b, block in enumerate(self.model.blocks):
            hooks.append(block.register_forward_pre_hook(lambda _m, args, b=b: self._on_block(b, args[0])))
        for m, block in enumerate(self.moe_blocks):
            hooks.append(block.ffn.router.register_forward_hook(lambda _m, _i, out, m=m: self._on_routing(m, out)))
        return hooks

    # ---------------------------------------------------------------- hooks
    def _on_forward(self, _mod, args, kwargs) -> None:
        tokens = args[0] if args else kwargs["tokens_BS"]
        cache = args[1] if len(args) > 1 else kwargs.get("cache")
        self._BS = (tokens.shape[0], tokens.shape[1])
        if self._window is not None:
            if self._window_len is None:  # a run of unknown length (moe serve, decode_batch)
                self._window_len = self.plan["calibration_tokens"] = DEFAULT_CALIBRATION_TOKENS
            if self._window_passes >= self._window_len:
                self._switch()  # before this pass, so the window's last step ran the window's plan
        for rec in (self.recorder, self._window):
            if rec is not None:
                rec.begin_forward(*self._BS, cache.length if cache is not None else 0)

    def _on_block(self, b: int, h_BSD: torch.Tensor) -> None:
        """Before MoE block b's attention: predictions for layers m .. m+depth, one decision pass."""
        m = self._moe_of_block.get(b)
        if m is None or self.runtime.resident[m]:
            return  # a dense block, or a layer whose experts all sit in slots: nothing to decide
        if not self._predicting:
            self.runtime.begin_layer(m, [])
            return
        raw = self.lookahead.predict_topk(b, h_BSD) if self.lookahead is not None else []
        if self._window is not None and raw:
            self._window.note_lookahead(raw)
        preds = to_predictions(raw)
        if self.learned is not None:
            T, raw = h_BSD.shape[0] * h_BSD.shape[1], []
            for d in range(self.depth + 1):
                j = m + d
                if j >= len(self.moe_blocks):
                    break
                prev = self._prev.get(j)
                prev = prev if prev is not None and prev.shape[0] == T else None
                raw.append((j, d, *self.learned.predict_topk(j, d, self._cur.get(m - 1), prev, T)))
            preds += to_predictions(raw)
        self.runtime.begin_layer(m, preds)

    def _on_routing(self, m: int, r) -> None:
        if self.recorder is not None:
            self.recorder.add(m, r.topk_idx_TK, r.topk_w_TK)
        if self._window is not None:
            if self.exact is not None and self._predicting:  # the exact prediction is the routing (distance 0)
                self._window.note_lookahead([(m, 0, r.topk_idx_TK, r.topk_w_TK)])
            self._window.add(m, r.topk_idx_TK, r.topk_w_TK)
        if self.learned is not None:
            self._cur[m] = r.topk_idx_TK
        if self.exact is not None and self._predicting and not self.runtime.resident[m]:
            self.runtime.begin_layer(m, [self.exact.from_routing(m, r.topk_idx_TK)])

    def _on_forward_end(self, _mod, _args, _out) -> None:
        B, S = self._BS
        for m, idx in self._cur.items():
            self._prev[m] = idx.view(B, S, -1)[:, -1]
        self._cur = {}
        self.runtime.end_pass()
        if self._window is not None:
            self._window_pass_done()

    # ---------------------------------------------------------------- generation
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: timing boundaries only

    @torch.no_grad()
    def forward(self, tokens_BS: torch.Tensor, cache: KVCache | None = None):
        return self.model(tokens_BS.to(self.device), cache)

    def decode_batch(self, *, max_batch: int, max_len: int, decode=None, generator: torch.Generator | None = None,
                     max_prefill_tokens: int | None = None, cuda_graphs: bool = False) -> DecodeBatch:
        """A step-wise DecodeBatch over this engine's model (sequences join and leave between
        steps; see core/generation.py). Statistics accumulate until reset_stats(). cuda_graphs:
        decode steps replay CUDA graphs (core/cuda_graphs.py), which needs every expert in a slot
        (replayed steps are not counted in the statistics)."""
        if cuda_graphs and not self.runtime.all_resident:
            need = self.store.layout.total_experts
            raise ValueError(f"--cuda-graphs needs every expert in a device slot ({need}; this engine has "
                             f"{self.pool.num_slots}): raise --gpu-expert-slots to {need} or drop --cuda-graphs")
        return DecodeBatch(self.model, max_batch=max_batch, max_len=max_len, decode=decode, generator=generator,
                           max_prefill_tokens=max_prefill_tokens, cuda_graphs=cuda_graphs)

    def stream(self, prompts, params: SamplingParams | Sequence[SamplingParams], *, decode=None,
               generator: torch.Generator | None = None, cuda_graphs: bool = False) -> Iterator[TokenEvent]:
        """Prompts of any lengths (left-padded into one batch); a TokenEvent per token as it is
        drawn. The report afterwards covers this generation (its times include the consumer's)."""
        for _, events in self._generation(prompts, params, decode, generator, None, cuda_graphs):
            yield from events

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens: int | None = None, *,
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None,
                 return_logits: bool = False, decode=None, cuda_graphs: bool = False, **sampling) -> GenerationResult:
        """Generate with the cache and report on it (cuda_graphs: decode steps replay CUDA graphs;
        every expert must sit in a slot; replayed steps are not in the cache statistics).

        prompts: a [B, S] tensor, or a list of token-id lists of any lengths (left-padded).
        params: SamplingParams (one, or one per prompt), or built from max_new_tokens, temperature,
        top_k and **sampling (top_p, repetition_penalty, seed, eos_token_ids, stop_token_ids, stop,
        ignore_eos). generator: one batch-wide generator (MoETransformer.generate's sampling, draw
        for draw). With no stop condition and equal-length prompts the tokens are
        MoETransformer.generate's."""
        if params is None:
            if max_new_tokens is None:
                raise ValueError("give max_new_tokens or params=SamplingParams(...)")
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, **sampling)
        seen: list[torch.Tensor] | None = [] if return_logits else None
        seqs = []
        for seqs, _ in self._generation(prompts, params, decode, generator, seen, cuda_graphs):
            pass
        tokens = torch.full((len(seqs), max(len(s.tokens) for s in seqs)), -1, dtype=torch.long)
        for b, s in enumerate(seqs):
            tokens[b, :len(s.tokens)] = torch.tensor(s.tokens)
        outputs = [SequenceOutput(s.tokens, s.text, s.finish_reason, s.stop_reason) for s in seqs]
        return GenerationResult(tokens, torch.stack(seen) if seen else None, self.report(), outputs)

    def _generation(self, prompts, params, decode, generator, seen: list | None, cuda_graphs: bool = False):
        """Yields (sequences, events) per forward pass: 1. prefill (timed, statistics snapshot),
        2. decode steps until every sequence stops, 3. timing into the statistics."""
        prompts = _prompt_lists(prompts)
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        width, B, new = max(len(p) for p in prompts), len(prompts), max(sp.max_new_tokens for sp in params_list)
        batch = self.decode_batch(max_batch=B, max_len=width + new, decode=decode, generator=generator,
                                  cuda_graphs=cuda_graphs)
        if self._window is not None and self._window_len is None:
            from moe_runtime.offload.simulate import calibration_passes
            # the simulator's calibration part of this run's decode steps (one definition)
            self._window_len = self.plan["calibration_tokens"] = calibration_passes(max(new - 1, 2))
            if self._window_len < 2:
                self._window = None
                self.plan.update(state="fixed", chosen="predictive", reason=(
                    f"no switch: a run of {new - 1} decode steps leaves a calibration window under 2 steps; "
                    f"the adaptive planner serves it all"))
        self.reset_stats()
        t0 = time.perf_counter()
        seqs, events = batch.add(prompts, params_list)
        if seen is not None:
            seen.append(self._logits_row(batch, seqs))
        self._sync()
        t1 = time.perf_counter()
        self.stats.mark_prefill(t1 - t0)
        yield seqs, events
        while batch.running:
            events = batch.step()
            if seen is not None:
                seen.append(self._logits_row(batch, seqs))
            yield seqs, events
        self._sync()
        produced = sum(len(s.tokens) for s in seqs)
        self.stats.mark_done(batch=B, prompt_tokens=width, new_tokens=new, generated_tokens=produced,
                             decode_tokens=produced - B, decode_s=time.perf_counter() - t1,
                             forward_passes=batch.forward_passes)

    @staticmethod
    def _logits_row(batch: DecodeBatch, seqs) -> torch.Tensor:
        """[B, V] logits the last tokens were drawn from; NaN for sequences already finished."""
        ids, logits_nV = batch.last_logits
        out = torch.full((len(seqs), logits_nV.shape[-1]), float("nan"))
        index = {s.seq_id: b for b, s in enumerate(seqs)}
        out[[index[i] for i in ids]] = logits_nV.float().cpu()  # host sync: only when the caller asks for logits
        return out

    def reset_stats(self) -> None:
        self.stats.reset()

    def report(self) -> dict[str, Any]:
        """Everything a user asks of an expert cache, JSON-able (metrics defined in offload/report.py)."""
        return engine_report(self)

    def trace(self) -> RoutingTrace:
        if self.recorder is None:
            raise ValueError("this engine does not record routing; construct it with record_trace=True")
        return self.recorder.to_trace()

    def close(self) -> MoETransformer:
        """Remove hooks, drain copies; with keep_banks, put the ExpertBanks back (model on the host)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.copies.synchronize()
        if self._banks is not None:
            for block, bank in zip(self.moe_blocks, self._banks):
                block.ffn.experts = bank
            self.model.to("cpu")
        return self.model


def _prompt_lists(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompt tensor has shape {tuple(prompts.shape)}; expected [batch, tokens]")
        return prompts.tolist()
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("no prompts given")
    return prompts


__all__ = ["ExpertCacheEngine", "GenerationResult", "PREDICTORS"]
