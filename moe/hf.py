"""Hugging Face MoE checkpoints <-> MoETransformer: load, stream experts, export, fine-tune.

Legend: L blocks, E experts, D model dim, F expert hidden dim, Fs shared/dense hidden dim, V vocab.

Families (config.json `architectures[0]`), each mapped field by field and tensor by tensor:

    family     architecture          attention                     FFN
    mixtral    MixtralForCausalLM    plain                         E experts, softmax top-k renormalised
    qwen2_moe  Qwen2MoeForCausalLM   q/k/v bias                    experts + shared expert * sigmoid gate
    olmoe      OlmoeForCausalLM      RMSNorm on q, k (all heads)   experts, norm_topk_prob from config
    qwen3_moe  Qwen3MoeForCausalLM   RMSNorm on q, k (per head)    experts, norm_topk_prob from config

Routed experts come in two layouts; both load and `export_hf` writes either:
    per_expert  what save_pretrained writes by default and what the Hub holds
        Mixtral: model.layers.{l}.block_sparse_moe.experts.{e}.w1 / w3 [F, D] (gate / up), w2 [D, F]
        others:  model.layers.{l}.mlp.experts.{e}.gate_proj / up_proj [F, D], down_proj [D, F]
    fused       transformers 5 in memory, save_pretrained(save_original_format=False)
        model.layers.{l}.mlp.experts.gate_up_proj [E, 2F, D] (rows [gate; up]), down_proj [E, D, F]
Ours: ExpertBank.w13_EDF2[e] = [gate^T | up^T], w2_EFD[e] = down^T.

Anything that would make our numbers differ from transformers' is refused with a message naming
the file and the field or tensor: an unknown architecture, a config field we do not model, a
missing, unexpected, mis-shaped or mis-typed tensor, an unreadable shard. The model is built on
the meta device, materialised once and filled in place shard by shard, so weights are never held
twice; `iter_hf_expert_tensors` streams experts one at a time for the expert-cache engine.
"""
from __future__ import annotations

import dataclasses
import json
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moe.config import MoEConfig, ModelConfig, RunConfig, TrainConfig
from moe.data import TOKEN_SUFFIXES, Corpus
from moe.experts import ExpertBank
from moe.model import MoETransformer, rotary_tables

CONFIG, INDEX, SINGLE, TOKENIZER = "config.json", "model.safetensors.index.json", "model.safetensors", "tokenizer.json"
ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                 "OlmoeForCausalLM": "olmoe", "Qwen3MoeForCausalLM": "qwen3_moe"}
FAMILY_ARCH = {family: arch for arch, family in ARCHITECTURES.items()}
EXPERT_LAYOUTS = ("per_expert", "fused")
TRAIN_ONLY_MOE_FIELDS = ("balance_coef", "balance_scope", "global_sync", "z_loss_coef", "aux_free_bias",
                         "bias_update_rate")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# transformers' class defaults for fields a config.json may leave out.
_DEFAULTS = {
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=4096 * 32),
    "qwen2_moe": dict(rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "olmoe": dict(rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "qwen3_moe": dict(rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=32768),
}
# Fields that never change the forward math: ids, bookkeeping, output flags.
_HARMLESS = {"_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
             "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "output_router_logits",
             "router_aux_loss_coef", "return_dict", "output_hidden_states", "output_attentions", "id2label",
             "label2id", "tokenizer_class", "initializer_range"}
_MISSING = object()


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint this runtime cannot load exactly; the message names the file and field."""


# ---------------------------------------------------------------- config.json -> RunConfig
class _Fields:
    """config.json as read, with typed access that records which fields were consumed."""

    def __init__(self, d: dict[str, Any], file: Path, family: str):
        self.d, self.file, self.family, self.used = d, file, family, set()

    def get(self, key: str, default: Any = _MISSING, kind: type = object) -> Any:
        self.used.add(key)
        value = self.d.get(key, default)
        if value is _MISSING or (value is None and default is _MISSING):
            raise HFCheckpointError(f"{self.file}: required field {key!r} is missing or null")
        if value is None or value is default:
            return value
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)  # JSON writes 10000.0 as 10000
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise HFCheckpointError(f"{self.file}: field {key}={value!r} should be of type {kind.__name__}")
        return value

    def expect(self, key: str, default: Any, ok: Callable[[Any], bool], why: str) -> Any:
        value = self.get(key, default)
        if not ok(value):
            raise HFCheckpointError(f"{self.file}: field {key}={value!r} is not supported: {why}")
        return value

    def alias(self, keys: tuple[str, ...], kind: type = int) -> Any:
        """A field transformers accepts under several names (attribute_map), e.g. num_experts."""
        present = {k: self.get(k, None, kind) for k in keys if k in self.d}
        values = {v for v in present.values() if v is not None}
        if not values:
            raise HFCheckpointError(f"{self.file}: required field {keys[0]!r} (or {', '.join(keys[1:])}) is missing")
        if len(values) > 1:
            raise HFCheckpointError(f"{self.file}: fields {present} disagree; keep one of them")
        return values.pop()


def _rope_theta(f: _Fields) -> float:
    """RoPE base; any scaled / partial / per-layer RoPE is refused (our rotary is plain)."""
    scaling, params = f.get("rope_scaling", None, dict), f.get("rope_parameters", None, dict)
    key, rp = ("rope_scaling", scaling) if scaling else ("rope_parameters", params or {})
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    if rope_type != "default" or any(isinstance(v, dict) for v in rp.values()):
        raise HFCheckpointError(f"{f.file}: field {key}={rp!r} is not supported: only plain RoPE "
                                f"(rope_type 'default', no scaling, one set for all layers) loads")
    partial = rp.get("partial_rotary_factor", f.get("partial_rotary_factor", 1.0, float))
    if partial != 1.0:
        raise HFCheckpointError(f"{f.file}: field partial_rotary_factor={partial} is not supported: "
                                f"MoETransformer rotates the whole head")
    theta = rp.get("rope_theta", f.get("rope_theta", _DEFAULTS[f.family]["rope_theta"], float))
    return float(theta)


def _sliding_window(f: _Fields) -> int | None:
    """The attention window if sliding-window attention is on in any layer, else None."""
    if f.family == "mixtral":
        return f.get("sliding_window", None, int)
    if f.family in ("qwen2_moe", "qwen3_moe"):
        on = f.get("use_sliding_window", False, bool)
        types = f.get("layer_types", None, list) or []
        f.get("max_window_layers", None, int)  # only selects layers when sliding is on (refused below)
        bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if bad:
            raise HFCheckpointError(f"{f.file}: field layer_types holds {bad}; only full attention loads")
        window = f.get("sliding_window", None, int)
        return (window or 0) if on or "sliding_attention" in types else None
    return None


def _attention_fields(f: _Fields, max_seq_len: int | None) -> dict[str, Any]:
    """ModelConfig kwargs every family shares (sizes, norms, RoPE, window)."""
    D, H = f.get("hidden_size", kind=int), f.get("num_attention_heads", kind=int)
    kv_default = H if f.family == "olmoe" else _MISSING
    Hk = f.get("num_key_value_heads", kv_default, int) or H
    head_dim = f.get("head_dim", None, int)
    if head_dim is not None and head_dim % 2:
        raise HFCheckpointError(f"{f.file}: field head_dim={head_dim} must be even for rotary embeddings")
    f.expect("hidden_act", "silu", lambda v: v == "silu",
             "the experts and MLPs of MoETransformer are SwiGLU with silu; only hidden_act='silu' loads")
    f.expect("attention_dropout", 0.0, lambda v: v == 0, "attention dropout is not implemented; set it to 0.0")
    for key in ("quantization_config", "auto_map"):
        if key in f.d:
            raise HFCheckpointError(f"{f.file}: field {key} is not supported: quantized checkpoints and "
                                    f"remote-code models do not load")
    max_pos = f.get("max_position_embeddings", _DEFAULTS[f.family]["max_position_embeddings"], int)
    seq = max_seq_len or max_pos
    window = _sliding_window(f)
    if window is not None and window < seq:
        raise HFCheckpointError(f"{f.file}: field sliding_window={window} is smaller than the longest sequence "
                                f"({'max_seq_len' if max_seq_len else 'max_position_embeddings'}={seq}): "
                                f"sliding-window attention is not implemented; pass max_seq_len <= {window} "
                                f"to load it for sequences that never leave the window" if window else
                                f"{f.file}: field layer_types enables sliding-window attention, which is not "
                                f"implemented")
    return dict(vocab_size=f.get("vocab_size", kind=int), d_model=D, n_layers=f.get("num_hidden_layers", kind=int),
                n_heads=H, n_kv_heads=Hk, head_dim=head_dim, max_seq_len=seq, rope_theta=_rope_theta(f),
                norm_eps=f.get("rms_norm_eps", _DEFAULTS[f.family]["rms_norm_eps"], float),
                tie_embeddings=f.get("tie_word_embeddings", False, bool),
                init_std=f.get("initializer_range", 0.02, float))


def _dense_prefix(f: _Fields, n_layers: int) -> int:
    """Qwen's dense layers (mlp_only_layers, decoder_sparse_step) as first_dense_layers, or refuse."""
    step = f.expect("decoder_sparse_step", 1, lambda v: isinstance(v, int) and v >= 1, "must be an int >= 1")
    only = f.get("mlp_only_layers", None, list) or []
    dense = [i for i in range(n_layers) if i in only or (i + 1) % step != 0]
    if dense != list(range(len(dense))):
        raise HFCheckpointError(f"{f.file}: fields decoder_sparse_step={step}, mlp_only_layers={only} make "
                                f"layers {dense} dense; MoETransformer supports dense layers only as a leading "
                                f"block (first_dense_layers)")
    if len(dense) == n_layers:
        raise HFCheckpointError(f"{f.file}: fields decoder_sparse_step={step}, mlp_only_layers={only} leave "
                                f"no MoE layer; this is a dense model")
    return len(dense)


def _moe_fields(f: _Fields, top_k: int, renorm: bool) -> dict[str, Any]:
    output_logits = f.get("output_router_logits", False, bool)
    coef = f.get("router_aux_loss_coef", 0.0, float)
    # transformers' f_i sums to K over experts, ours to 1: the same loss needs K times the coefficient.
    return dict(top_k=top_k, norm_topk_prob=renorm, balance_coef=coef * top_k if output_logits else 0.0)


def _family_config(f: _Fields, max_seq_len: int | None) -> ModelConfig:
    """Explicit per-family mapping of config.json onto ModelConfig / MoEConfig."""
    kw = _attention_fields(f, max_seq_len)
    fam = f.family
    top_k = f.get("num_experts_per_tok", kind=int)
    if fam == "mixtral":
        f.expect("router_jitter_noise", 0.0, lambda v: v == 0, "router jitter is not implemented; set it to 0.0")
        moe = MoEConfig(num_experts=f.alias(("num_local_experts", "num_experts")),
                        d_expert=f.get("intermediate_size", kind=int), **_moe_fields(f, top_k, True))
        return ModelConfig(moe=moe, **kw)
    renorm = f.get("norm_topk_prob", False, bool)
    if fam == "olmoe":
        f.expect("attention_bias", False, lambda v: v is False, "biases on q/k/v/o projections are not modelled")
        f.expect("clip_qkv", None, lambda v: v is None, "q/k/v clipping is not implemented in moe.model")
        moe = MoEConfig(num_experts=f.alias(("num_experts", "num_local_experts")),
                        d_expert=f.get("intermediate_size", kind=int), **_moe_fields(f, top_k, renorm))
        return ModelConfig(moe=moe, qk_norm="full", **kw)
    dense = _dense_prefix(f, kw["n_layers"])
    common = dict(num_experts=f.alias(("num_experts", "num_local_experts")),
                  d_expert=f.get("moe_intermediate_size", kind=int), **_moe_fields(f, top_k, renorm))
    d_dense = f.get("intermediate_size", None, int)  # the dense layers' MLP; unused without them
    if dense and d_dense is None:
        raise HFCheckpointError(f"{f.file}: required field 'intermediate_size' (dense layers' MLP) is missing")
    if fam == "qwen2_moe":
        shared = f.expect("shared_expert_intermediate_size", _MISSING, lambda v: isinstance(v, int) and v > 0,
                          "the shared expert needs a positive hidden size")
        moe = MoEConfig(num_shared_experts=1, d_shared_expert=shared, shared_expert_gate=True, **common)
        return ModelConfig(moe=moe, qkv_bias=f.get("qkv_bias", True, bool), first_dense_layers=dense,
                           d_dense_ffn=d_dense if dense else None, **kw)
    f.expect("attention_bias", False, lambda v: v is False, "biases on q/k/v/o projections are not modelled")
    return ModelConfig(moe=MoEConfig(**common), qk_norm="head", first_dense_layers=dense,
                       d_dense_ffn=d_dense if dense else None, **kw)


def finetune_defaults(max_seq_len: int) -> TrainConfig:
    """TrainConfig for fine-tuning a pretrained checkpoint: small lr, no weight decay."""
    return TrainConfig(max_steps=200, batch_size=4, seq_len=min(512, max_seq_len), lr=2e-5, warmup_steps=20,
                       weight_decay=0.0, eval_interval=50, ckpt_interval=100)


def _read_config(path: Path, max_seq_len: int | None, ignore: tuple[str, ...]) -> tuple[str, RunConfig, _Fields]:
    file = path / CONFIG
    if not file.is_file():
        raise HFCheckpointError(f"{path}: no {CONFIG}; pass a Hugging Face checkpoint directory")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFCheckpointError(f"{file}: not valid JSON ({e})") from None
    archs = d.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise HFCheckpointError(f"{file}: field architectures={archs!r} is not supported; supported: "
                                f"{', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[archs[0]]
    if d.get("model_type", family) != family:
        raise HFCheckpointError(f"{file}: field model_type={d['model_type']!r} does not match {archs[0]} "
                                f"(expected {family!r})")
    f = _Fields(d, file, family)
    try:
        cfg = _family_config(f, max_seq_len)
    except HFCheckpointError:
        raise
    except ValueError as e:  # ModelConfig / MoEConfig validation
        raise HFCheckpointError(f"{file}: {e}") from None
    unknown = sorted(set(d) - f.used - _HARMLESS - set(ignore))
    if unknown:
        raise HFCheckpointError(f"{file}: unknown field(s) {unknown} for {archs[0]}; moe-runtime does not know "
                                f"whether they change the model's math. If they do not, pass "
                                f"ignore_config_fields={tuple(unknown)}")
    return family, RunConfig(name=path.name, model=cfg, train=finetune_defaults(cfg.max_seq_len)), f


# ---------------------------------------------------------------- tensor plan (HF name -> our parameter)
@dataclass(frozen=True)
class _Slot:
    """Where one HF tensor lives in MoETransformer: param[index], with dims `transpose` swapped."""

    param: str
    hf_shape: tuple[int, ...]
    index: tuple = ()
    transpose: tuple[int, int] | None = None


def _whole(param: str, *shape: int) -> _Slot:
    return _Slot(param, tuple(shape))


def _swiglu_plan(hf: str, ours: str, D: int, F: int) -> dict[str, _Slot]:
    """Dense MLP / shared expert: gate_proj, up_proj [F, D] are the rows of our w13 [2F, D]."""
    return {hf + "gate_proj.weight": _Slot(ours + "w13.weight", (F, D), (slice(0, F),)),
            hf + "up_proj.weight": _Slot(ours + "w13.weight", (F, D), (slice(F, 2 * F),)),
            hf + "down_proj.weight": _whole(ours + "w2.weight", D, F)}


def _attention_plan(hf: str, ours: str, cfg: ModelConfig) -> dict[str, _Slot]:
    D, Dq, Dkv = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    plan = {}
    for name, mine, out in (("q_proj", "wq", Dq), ("k_proj", "wk", Dkv), ("v_proj", "wv", Dkv)):
        plan[f"{hf}{name}.weight"] = _whole(f"{ours}{mine}.weight", out, D)
        if cfg.qkv_bias:
            plan[f"{hf}{name}.bias"] = _whole(f"{ours}{mine}.bias", out)
    plan[hf + "o_proj.weight"] = _whole(ours + "wo.weight", D, Dq)
    if cfg.qk_norm is not None:
        per_head = cfg.qk_norm == "head"
        plan[hf + "q_norm.weight"] = _whole(ours + "q_norm.weight", cfg.head_dim if per_head else Dq)
        plan[hf + "k_norm.weight"] = _whole(ours + "k_norm.weight", cfg.head_dim if per_head else Dkv)
    return plan


def _moe_prefix(family: str, layout: str, block: int) -> str:
    return f"model.layers.{block}." + ("block_sparse_moe." if family == "mixtral" and layout == "per_expert"
                                        else "mlp.")


def _expert_names(family: str) -> tuple[str, str, str]:
    """Per-expert tensor names of (gate, up, down)."""
    return ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def _moe_plan(family: str, layout: str, block: int, cfg: ModelConfig) -> dict[str, _Slot]:
    m, D = cfg.moe, cfg.d_model
    E, F = m.num_experts, m.d_expert
    moe, ours = _moe_prefix(family, layout, block), f"blocks.{block}.ffn."
    w13, w2 = ours + "experts.w13_EDF2", ours + "experts.w2_EFD"
    plan = {moe + "gate.weight": _whole(ours + "router.weight_ED", E, D)}
    if layout == "fused":
        plan[moe + "experts.gate_up_proj"] = _Slot(w13, (E, 2 * F, D), (), (1, 2))
        plan[moe + "experts.down_proj"] = _Slot(w2, (E, D, F), (), (1, 2))
    else:
        gate, up, down = _expert_names(family)
        for e in range(E):
            x = f"{moe}experts.{e}."
            plan[f"{x}{gate}.weight"] = _Slot(w13, (F, D), (e, slice(None), slice(0, F)), (0, 1))
            plan[f"{x}{up}.weight"] = _Slot(w13, (F, D), (e, slice(None), slice(F, 2 * F)), (0, 1))
            plan[f"{x}{down}.weight"] = _Slot(w2, (D, F), (e,), (0, 1))
    hf = f"model.layers.{block}.mlp."
    if m.num_shared_experts:
        plan.update(_swiglu_plan(hf + "shared_expert.", ours + "shared.", D, m.d_shared_expert))
    if m.shared_expert_gate:
        plan[hf + "shared_expert_gate.weight"] = _whole(ours + "shared_gate.weight", 1, D)
    return plan


def tensor_plan(family: str, cfg: ModelConfig, layout: str = "per_expert") -> dict[str, Any]:
    """HF tensor name -> _Slot (our parameter, index, transpose, HF shape), explicit per family."""
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"expert_layout={layout!r} is not one of {', '.join(EXPERT_LAYOUTS)}")
    D, V = cfg.d_model, cfg.vocab_size
    plan = {"model.embed_tokens.weight": _whole("embed.weight", V, D), "model.norm.weight": _whole("norm.weight", D)}
    if not cfg.tie_embeddings:
        plan["lm_head.weight"] = _whole("head.weight", V, D)
    for l in range(cfg.n_layers):
        hf, ours = f"model.layers.{l}.", f"blocks.{l}."
        plan[hf + "input_layernorm.weight"] = _whole(ours + "attn_norm.weight", D)
        plan[hf + "post_attention_layernorm.weight"] = _whole(ours + "ffn_norm.weight", D)
        plan.update(_attention_plan(hf + "self_attn.", ours + "attn.", cfg))
        if cfg.is_moe_layer(l):
            plan.update(_moe_plan(family, layout, l, cfg))
        else:
            plan.update(_swiglu_plan(hf + "mlp.", ours + "ffn.", D, cfg.d_dense_ffn))
    return plan


# ---------------------------------------------------------------- the checkpoint on disk
@dataclass(frozen=True)
class _Found:
    file: Path
    shape: tuple[int, ...]
    dtype: str
    """safetensors dtype code: F32, BF16, ..."""


@dataclass(frozen=True)
class HFCheckpoint:
    """A validated HF checkpoint directory: its config mapped to ours, and every tensor's header."""

    path: Path
    family: str
    run: RunConfig
    dtype: torch.dtype
    """The dtype every tensor is stored in."""
    layout: str
    """'per_expert' or 'fused' (see module docstring)."""
    files: tuple[Path, ...]
    tensors: dict[str, _Found]
    plan: dict[str, _Slot]


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFCheckpointError(f"{index}: not a valid index ({type(e).__name__}: {e})") from None
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            if not (path / file).is_file():
                raise HFCheckpointError(f"{path / file}: shard file is missing ({INDEX} lists {len(names)} "
                                        f"tensor(s) in it, e.g. {names[0]})")
        return [path / f for f in sorted(by_file)], weight_map
    if (path / SINGLE).is_file():
        return [path / SINGLE], None
    bins = sorted(p.name for p in path.glob("*.bin"))
    raise HFCheckpointError(f"{path}: no {SINGLE} or {INDEX}" + (f"; pickle checkpoints ({', '.join(bins[:3])}) "
                            f"are refused, convert them to safetensors" if bins else ""))


def _read_headers(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, _Found]:
    found: dict[str, _Found] = {}
    for fp in files:
        try:
            with safe_open(str(fp), framework="pt") as h:
                for name in h.keys():
                    sl = h.get_slice(name)
                    if name in found:
                        raise HFCheckpointError(f"{fp}: tensor {name} is also in {found[name].file.name}")
                    found[name] = _Found(fp, tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise HFCheckpointError(f"{fp}: not a readable safetensors file ({e}); it is truncated or "
                                    f"corrupted, re-download or re-save it") from None
    for name, file in (weight_map or {}).items():
        if name not in found:
            raise HFCheckpointError(f"{INDEX} lists tensor {name} in {file}, but no shard holds it")
        if found[name].file.name != file:
            raise HFCheckpointError(f"{INDEX} lists tensor {name} in {file}, but it is in {found[name].file.name}")
    return found


def _expert_layout(found: dict[str, _Found], path: Path) -> str:
    fused = any(n.endswith(".experts.gate_up_proj") for n in found)
    split = any(".experts.0." in n for n in found)
    if fused and split:
        raise HFCheckpointError(f"{path}: both fused (experts.gate_up_proj) and per-expert (experts.0.*) "
                                f"tensors are present; a checkpoint must use one layout")
    return "fused" if fused else "per_expert"


def _checkpoint_dtype(fields: _Fields, found: dict[str, _Found]) -> tuple[torch.dtype, str]:
    for key in ("dtype", "torch_dtype"):
        name = fields.d.get(key)
        if name is not None:
            if name not in _DTYPES:
                raise HFCheckpointError(f"{fields.file}: field {key}={name!r} is not one of {', '.join(_DTYPES)}")
            return _DTYPES[name], f"{CONFIG} field {key}={name!r}"
    name, first = min(found.items())
    if first.dtype not in _ST_DTYPES:
        raise HFCheckpointError(f"{first.file}: tensor {name} has dtype {first.dtype}; only "
                                f"{', '.join(_ST_DTYPES)} load (quantized checkpoints are refused)")
    return _ST_DTYPES[first.dtype], f"tensor {name} ({first.dtype})"


def _check_tensors(path: Path, plan: dict[str, _Slot], found: dict[str, _Found], dtype: torch.dtype,
                   dtype_source: str, tied: bool) -> None:
    """Every planned tensor present with the planned shape and the checkpoint's dtype; nothing else."""
    missing = [n for n in plan if n not in found]
    if missing:
        raise HFCheckpointError(f"{path}: {len(missing)} tensor(s) that {CONFIG} implies are in no shard: "
                                f"{missing[:4]}{' ...' if len(missing) > 4 else ''}")
    def ignorable(n: str) -> bool:  # derived buffers old exports carry; a tied head's duplicate
        return n.endswith("rotary_emb.inv_freq") or (tied and n == "lm_head.weight")

    unexpected = [n for n in found if n not in plan and not ignorable(n)]
    if unexpected:
        n = unexpected[0]
        raise HFCheckpointError(f"{found[n].file}: unexpected tensor(s) {unexpected[:4]}"
                                f"{' ...' if len(unexpected) > 4 else ''} that {CONFIG} does not account for")
    for name, slot in plan.items():
        t = found[name]
        if t.shape != slot.hf_shape:
            raise HFCheckpointError(f"{t.file}: tensor {name} has shape {list(t.shape)}, but {CONFIG} implies "
                                    f"{list(slot.hf_shape)}")
        if _ST_DTYPES.get(t.dtype) != dtype:
            raise HFCheckpointError(f"{t.file}: tensor {name} has dtype {t.dtype}, but {dtype_source} says "
                                    f"{str(dtype).removeprefix('torch.')}")


def read_hf(path: str | Path, *, max_seq_len: int | None = None,
            ignore_config_fields: tuple[str, ...] = ()) -> HFCheckpoint:
    """Read and validate config.json and every shard header; reads no tensor data."""
    path = Path(path)
    if not path.is_dir():
        raise HFCheckpointError(f"{path} is not a directory; pass a local Hugging Face checkpoint directory")
    family, run, fields = _read_config(path, max_seq_len, tuple(ignore_config_fields))
    files, weight_map = _shard_files(path)
    found = _read_headers(files, weight_map)
    if not found:
        raise HFCheckpointError(f"{files[0]}: holds no tensors")
    layout = _expert_layout(found, path)
    dtype, dtype_source = _checkpoint_dtype(fields, found)
    plan = tensor_plan(family, run.model, layout)
    _check_tensors(path, plan, found, dtype, dtype_source, run.model.tie_embeddings)
    return HFCheckpoint(path, family, run, dtype, layout, tuple(files), found, plan)


# ---------------------------------------------------------------- loading
def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, load_experts: bool) -> MoETransformer:
    """The model with uninitialised storage (no random init); experts stay on meta unless load_experts."""
    with torch.device("meta"):
        model = MoETransformer(cfg).to(dtype)
    for module in model.modules():
        if load_experts or not isinstance(module, ExpertBank):
            module.to_empty(device=device, recurse=False)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    for layer in model.moe_layers():
        layer.router.bias_E = torch.zeros(cfg.moe.num_experts, device=device)
    return model


def _place(param: torch.Tensor, slot: _Slot, t: torch.Tensor) -> None:
    dst = param.data[slot.index] if slot.index else param.data
    dst.copy_(t.transpose(*slot.transpose) if slot.transpose else t)


@torch.no_grad()
def load_hf_weights(ck: HFCheckpoint, model: MoETransformer) -> None:
    """Stream every tensor of `ck` into `model`'s parameters in place, one shard file at a time.

    Expert parameters on the meta device are skipped (their data goes to an expert store instead).
    """
    params = dict(model.named_parameters())
    for name, numel in _coverage(ck.plan).items():  # internal invariant: the plan fills every element
        assert params[name].numel() == numel, f"tensor plan covers {numel} of {params[name].numel()} in {name}"
    assert set(params) == set(_coverage(ck.plan)), "tensor plan and model parameters differ"
    for fp in ck.files:
        with safe_open(str(fp), framework="pt") as h:
            for name in h.keys():
                slot = ck.plan.get(name)
                if slot is None or params[slot.param].is_meta:
                    continue
                _place(params[slot.param], slot, h.get_tensor(name))


def _coverage(plan: dict[str, _Slot]) -> dict[str, int]:
    out: dict[str, int] = {}
    for slot in plan.values():
        out[slot.param] = out.get(slot.param, 0) + math.prod(slot.hf_shape)
    return out


def load_hf(path: str | Path, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
            max_seq_len: int | None = None, load_experts: bool = True,
            ignore_config_fields: tuple[str, ...] = ()) -> tuple[MoETransformer, RunConfig, Any]:
    """Load a local HF MoE checkpoint directory: (model in eval mode, RunConfig, tokenizer or None).

    dtype: parameters' dtype (default: the checkpoint's). max_seq_len: rotary table size (default
    max_position_embeddings). load_experts=False leaves the routed experts on the meta device (no
    memory) for an engine that fills its host store with `iter_hf_expert_tensors`.
    The tokenizer is a `tokenizers.Tokenizer` when the directory has tokenizer.json.
    """
    ck = read_hf(path, max_seq_len=max_seq_len, ignore_config_fields=ignore_config_fields)
    model = _empty_model(ck.run.model, _as_dtype(dtype) or ck.dtype, torch.device(device), load_experts)
    load_hf_weights(ck, model)
    return model.eval(), ck.run, load_tokenizer(ck.path)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class HFExpert(NamedTuple):
    """One routed expert in our layout."""

    moe_layer: int
    """MoE-layer index l = block - first_dense_layers (how offload.HostExpertStore addresses layers)."""
    expert: int
    w13_DF2: torch.Tensor
    """[D, 2F] = [gate | up]."""
    w2_FD: torch.Tensor
    """[F, D] down projection."""


def iter_hf_expert_tensors(path: str | Path | HFCheckpoint, *, dtype: torch.dtype | str | None = None
                           ) -> Iterator[HFExpert]:
    """Yield every routed expert, layer-major, reading only that expert's bytes from its shard(s).

    Memory: one expert at a time (plus the OS page cache of the memory-mapped shards).
    """
    ck = path if isinstance(path, HFCheckpoint) else read_hf(path)
    cfg, dt = ck.run.model, _as_dtype(dtype) or ck.dtype
    E, F = cfg.moe.num_experts, cfg.moe.d_expert
    gate, up, down = _expert_names(ck.family)
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def read(name: str, expert: int | None = None) -> torch.Tensor:
            fp = ck.tensors[name].file
            if fp not in handles:
                handles[fp] = stack.enter_context(safe_open(str(fp), framework="pt"))
            if expert is None:
                return handles[fp].get_tensor(name)
            return handles[fp].get_slice(name)[expert:expert + 1][0]  # one expert of a fused stack

        for l, block in enumerate(range(cfg.first_dense_layers, cfg.n_layers)):
            moe = _moe_prefix(ck.family, ck.layout, block) + "experts."
            for e in range(E):
                if ck.layout == "fused":
                    w13 = read(moe + "gate_up_proj", e).T  # [2F, D] -> [D, 2F]
                    w2 = read(moe + "down_proj", e).T  # [D, F] -> [F, D]
                else:
                    x = f"{moe}{e}."
                    w13 = torch.cat([read(f"{x}{gate}.weight").T, read(f"{x}{up}.weight").T], dim=1)
                    w2 = read(f"{x}{down}.weight").T
                assert w13.shape == (cfg.d_model, 2 * F), w13.shape
                yield HFExpert(l, e, w13.to(dt).contiguous(), w2.to(dt).contiguous())


# ---------------------------------------------------------------- tokenizer
def load_tokenizer(path: str | Path) -> Any:
    """`tokenizers.Tokenizer` from path/tokenizer.json, or None when there is none (token ids in and out)."""
    file = Path(path) / TOKENIZER
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise HFCheckpointError(f"{file} needs the `tokenizers` package: pip install 'moe-runtime[hf]'") from None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise HFCheckpointError(f"{file}: not a valid tokenizers file ({e})") from None


def tokenized_corpus(tokenizer: Any, data: str | Path, vocab_size: int, val_fraction: float = 0.05) -> Corpus:
    """A text file or directory of text files, tokenized with the checkpoint's tokenizer."""
    p = Path(data)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    ids: list[int] = []
    for f in files:
        ids.extend(tokenizer.encode(f.read_text(encoding="utf-8", errors="replace")).ids)
    if len(ids) < 16:
        raise ValueError(f"--data {p}: only {len(ids)} tokens after tokenization; pass more text")
    if max(ids) >= vocab_size:
        raise ValueError(f"--data {p}: {TOKENIZER} produced id {max(ids)} >= the model's vocab_size={vocab_size}")
    tokens = torch.tensor(ids, dtype=torch.long)
    n_val = max(1, math.ceil(len(tokens) * val_fraction))
    return Corpus(tokens[:-n_val], tokens[-n_val:], f"{p} tokenized with {TOKENIZER} ({len(tokens)} tokens)",
                  vocab_size)


# ---------------------------------------------------------------- fine-tuning
def trainer_from_hf(path: str | Path, train_config: TrainConfig | None = None, *,
                    moe_overrides: dict[str, Any] | None = None, max_seq_len: int | None = None,
                    ignore_config_fields: tuple[str, ...] = (), **trainer_kwargs: Any):
    """A `moe.train.Trainer` whose model holds the checkpoint's weights (fp32 master weights).

    train_config: default `finetune_defaults`. moe_overrides: balance-loss options only
    (TRAIN_ONLY_MOE_FIELDS), e.g. {"balance_coef": 0.01, "balance_scope": "global_batch"}.
    With a tokenizer.json, `data=` text is tokenized with it (token files pass through).
    """
    from moe.train import Trainer  # moe.train imports plotting; keep `import moe.hf` light

    ck = read_hf(path, max_seq_len=max_seq_len, ignore_config_fields=ignore_config_fields)
    bad = sorted(set(moe_overrides or {}) - set(TRAIN_ONLY_MOE_FIELDS))
    if bad:
        raise ValueError(f"moe_overrides {bad} would change the checkpoint's math; only {TRAIN_ONLY_MOE_FIELDS} "
                         f"may be overridden when fine-tuning")
    cfg = ck.run.model
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **(moe_overrides or {})))
    run = RunConfig(name=ck.run.name, model=cfg, train=train_config or ck.run.train)
    tokenizer = load_tokenizer(ck.path)
    if tokenizer is not None and "corpus" not in trainer_kwargs:
        data = trainer_kwargs.pop("data", None)
        if data is None:
            raise ValueError(f"{ck.path} has a {TOKENIZER}: pass data= (text, tokenized with it) or a token file; "
                             f"the default byte-level corpus does not match this vocabulary")
        if Path(data).suffix in TOKEN_SUFFIXES:
            trainer_kwargs["data"] = data
        else:
            trainer_kwargs["corpus"] = tokenized_corpus(tokenizer, data, cfg.vocab_size)
    trainer = Trainer(run, **trainer_kwargs)
    load_hf_weights(ck, trainer.model)  # in place: the optimizer already holds these parameters
    return trainer


# ---------------------------------------------------------------- export
def _family_problems(cfg: ModelConfig, family: str) -> list[str]:
    """Why cfg cannot be written as `family` (empty: it can, with identical math)."""
    m, p = cfg.moe, []
    want_qk = {"mixtral": None, "qwen2_moe": None, "olmoe": "full", "qwen3_moe": "head"}[family]
    if cfg.qk_norm != want_qk:
        p.append(f"qk_norm={cfg.qk_norm!r} (needs {want_qk!r})")
    if cfg.qkv_bias and family != "qwen2_moe":
        p.append("qkv_bias=True (only qwen2_moe has q/k/v biases)")
    shared = m.num_shared_experts > 0 and m.shared_expert_gate
    if family == "qwen2_moe" and not shared:
        p.append("no gated shared expert (qwen2_moe needs num_shared_experts >= 1 and shared_expert_gate=True)")
    if family != "qwen2_moe" and (m.num_shared_experts or m.shared_expert_gate):
        p.append(f"num_shared_experts={m.num_shared_experts} (only qwen2_moe has a shared expert)")
    if cfg.first_dense_layers and family in ("mixtral", "olmoe"):
        p.append(f"first_dense_layers={cfg.first_dense_layers} (only qwen2_moe / qwen3_moe have dense layers)")
    if family == "mixtral" and not m.norm_topk_prob:
        p.append(f"norm_topk_prob={m.norm_topk_prob} (mixtral always renormalises the top-k weights)")
    if m.score_func != "softmax":
        p.append(f"score_func={m.score_func!r} (transformers' routers are softmax)")
    if m.capacity_factor is not None:
        p.append(f"capacity_factor={m.capacity_factor} (transformers is dropless)")
    if m.router_position != "post_attention":
        p.append(f"router_position={m.router_position!r} (transformers routes after attention)")
    return p


def infer_family(cfg: ModelConfig) -> str:
    """The HF family that represents cfg exactly, or ValueError listing what each family lacks."""
    problems = {fam: _family_problems(cfg, fam) for fam in FAMILY_ARCH}
    for fam, p in problems.items():
        if not p:
            return fam
    raise ValueError("no Hugging Face family represents this model exactly: " +
                     "; ".join(f"{fam}: {', '.join(p)}" for fam, p in problems.items()))


def hf_config(cfg: ModelConfig, family: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for cfg as `family` (ValueError when the family cannot represent it)."""
    if family not in FAMILY_ARCH:
        raise ValueError(f"family={family!r} is not one of {', '.join(FAMILY_ARCH)}")
    problems = _family_problems(cfg, family)
    if problems:
        raise ValueError(f"the model cannot be exported as {family}: {'; '.join(problems)}")
    m = cfg.moe
    c: dict[str, Any] = {
        "architectures": [FAMILY_ARCH[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}, "rope_theta": cfg.rope_theta,
        "initializer_range": cfg.init_std, "num_experts_per_tok": m.top_k, "use_cache": True,
        "output_router_logits": False, "router_aux_loss_coef": m.balance_coef / m.top_k,
        "dtype": str(dtype).removeprefix("torch.")}
    renorm = m.norm_topk_prob
    if family == "mixtral":
        c.update(intermediate_size=m.d_expert, num_local_experts=m.num_experts, sliding_window=None,
                 router_jitter_noise=0.0)
    elif family == "olmoe":
        c.update(intermediate_size=m.d_expert, num_experts=m.num_experts, norm_topk_prob=renorm,
                 attention_bias=False, clip_qkv=None)
    else:
        c.update(intermediate_size=cfg.d_dense_ffn, moe_intermediate_size=m.d_expert, num_experts=m.num_experts,
                 norm_topk_prob=renorm, decoder_sparse_step=1, mlp_only_layers=list(range(cfg.first_dense_layers)),
                 use_sliding_window=False, sliding_window=None)
        if family == "qwen2_moe":
            c.update(shared_expert_intermediate_size=m.d_shared_expert, qkv_bias=cfg.qkv_bias)
        else:
            c.update(attention_bias=False)
    return c


def _shard_groups(plan: dict[str, _Slot], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    groups: list[list[str]] = [[]]
    size = 0
    for name, slot in plan.items():
        nbytes = math.prod(slot.hf_shape) * itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def export_hf(model: MoETransformer, run_config: RunConfig | ModelConfig, out_dir: str | Path,
              family: str | None = None, *, dtype: torch.dtype | str | None = None,
              expert_layout: str = "per_expert", max_shard_bytes: int = 4 * 2**30, tokenizer: Any = None,
              extra_config: dict[str, Any] | None = None) -> Path:
    """Write model as a Hugging Face checkpoint (config.json + safetensors) that transformers loads.

    family: mixtral | qwen2_moe | olmoe | qwen3_moe (default: the one that represents the model
    exactly). dtype: stored dtype (default the parameters'). expert_layout: 'per_expert' (what the
    Hub holds) or 'fused'. extra_config: fields merged into config.json (e.g. token ids).
    Memory: one shard's tensors at a time. out_dir must not hold a checkpoint already.
    """
    cfg = run_config.model if isinstance(run_config, RunConfig) else run_config
    if cfg != model.cfg:
        raise ValueError("run_config.model differs from model.cfg; pass the config the model was built with")
    family = family or infer_family(cfg)
    dt = _as_dtype(dtype) or model.embed.weight.dtype
    config = {**hf_config(cfg, family, dt), **(extra_config or {})}
    for layer in model.moe_layers():
        if bool(layer.router.bias_E.any()):
            raise ValueError("the routers carry aux-free selection biases (aux_free_bias); transformers has no "
                             "such bias, so the exported model would route differently")
    out = Path(out_dir)
    if out.exists() and any(out.glob("*.safetensors")) or (out / CONFIG).exists():
        raise ValueError(f"{out} already holds a checkpoint; export to a new directory")
    out.mkdir(parents=True, exist_ok=True)
    plan = tensor_plan(family, cfg, expert_layout)
    params = dict(model.named_parameters())
    groups = _shard_groups(plan, torch.empty((), dtype=dt).element_size(), max_shard_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = SINGLE if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: _hf_tensor(params[plan[n].param], plan[n], dt) for n in names}
        save_file(shard, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update({n: file for n in names})
    if len(groups) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save(str(out / TOKENIZER))
    return out


def _hf_tensor(param: torch.Tensor, slot: _Slot, dtype: torch.dtype) -> torch.Tensor:
    t = param.detach()[slot.index] if slot.index else param.detach()
    if slot.transpose:
        t = t.transpose(*slot.transpose)
    return t.to(device="cpu", dtype=dtype, copy=True).contiguous()


__all__ = ["HFCheckpointError", "HFCheckpoint", "HFExpert", "read_hf", "load_hf", "load_hf_weights",
           "iter_hf_expert_tensors", "load_tokenizer", "tokenized_corpus", "trainer_from_hf", "finetune_defaults",
           "export_hf", "hf_config", "infer_family", "tensor_plan", "ARCHITECTURES", "EXPERT_LAYOUTS",
           "TRAIN_ONLY_MOE_FIELDS"]
