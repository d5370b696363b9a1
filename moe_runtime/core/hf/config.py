"""config.json -> RunConfig: per-family field maps and refusals."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from moe_runtime.core.config import MoEConfig, ModelConfig, RunConfig, TrainConfig
from moe_runtime.core.hf.errors import HFCheckpointError

CONFIG, INDEX, SINGLE, TOKENIZER = "config.json", "model.safetensors.index.json", "model.safetensors", "tokenizer.json"

ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                 "OlmoeForCausalLM": "olmoe", "Qwen3MoeForCausalLM": "qwen3_moe", "GptOssForCausalLM": "gpt_oss"}
FAMILY_ARCH = {family: arch for arch, family in ARCHITECTURES.items()}
EXPERT_LAYOUTS = ("per_expert", "fused")
GPT_OSS_LAYOUTS = ("fused", "mxfp4")
"""gpt-oss experts: 'fused' float stacks (save_pretrained of a float model) or 'mxfp4' *_blocks / *_scales."""
TRAIN_ONLY_MOE_FIELDS = ("balance_coef", "balance_scope", "global_sync", "z_loss_coef", "aux_free_bias",
                         "bias_update_rate", "balance_pooling")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# transformers' class defaults for fields a config.json may leave out.
_DEFAULTS = {
    "mixtral": dict(rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=4096 * 32),
    "qwen2_moe": dict(rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "olmoe": dict(rope_theta=1e4, rms_norm_eps=1e-5, max_position_embeddings=4096),
    "qwen3_moe": dict(rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "gpt_oss": dict(rope_theta=150000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
}
# Fields that never change the forward math: ids, bookkeeping, output flags.
_HARMLESS = {"_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
             "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "output_router_logits",
             "router_aux_loss_coef", "return_dict", "output_hidden_states", "output_attentions", "id2label",
             "label2id", "tokenizer_class", "initializer_range"}
_MISSING = object()





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


def gpt_oss_rope(f: _Fields, max_pos: int) -> dict[str, Any]:
    from moe_runtime.core.hf.gpt_oss import yarn_fields
    return yarn_fields(f, max_pos, _DEFAULTS["gpt_oss"]["rope_theta"])


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
        if key in f.d and not (key == "quantization_config" and f.family == "gpt_oss"):
            raise HFCheckpointError(f"{f.file}: field {key} is not supported: quantized checkpoints and "
                                    f"remote-code models do not load")
    max_pos = f.get("max_position_embeddings", _DEFAULTS[f.family]["max_position_embeddings"], int)
    seq = max_seq_len or max_pos
    window = _sliding_window(f)
    if window is not None and window < seq:
        raise HFCheckpointError(f"{f.file}: field sliding_window={window} is smaller than the longest sequence "
                                f"({'max_seq_len' if max_seq_len else 'max_position_embeddings'}={seq}): "
                                f"sliding-window attention is not implemented; pass max_seq_len={window} "
                                f"(Python) or --max-seq-len {window} (moe generate --hf) to load it for sequences "
                                f"that never leave the window" if window else
                                f"{f.file}: field layer_types enables sliding-window attention, which is not "
                                f"implemented")
    rope = gpt_oss_rope(f, max_pos) if f.family == "gpt_oss" else dict(rope_theta=_rope_theta(f))
    return dict(vocab_size=f.get("vocab_size", kind=int), d_model=D, n_layers=f.get("num_hidden_layers", kind=int),
                n_heads=H, n_kv_heads=Hk, head_dim=head_dim, max_seq_len=seq, **rope,
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
    # transformers pools f and p over all layers before the product (balance_pooling="pooled"), and its
    # f_i sums to K over experts where ours sums to 1: the same loss needs K times the coefficient.
    # Per forward pass, like transformers: balance_scope="micro_batch".
    return dict(top_k=top_k, norm_topk_prob=renorm, balance_coef=coef * top_k if output_logits else 0.0,
                balance_pooling="pooled", balance_scope="micro_batch")


def _family_config(f: _Fields, max_seq_len: int | None) -> ModelConfig:
    """Explicit per-family mapping of config.json onto ModelConfig / MoEConfig."""
    kw = _attention_fields(f, max_seq_len)
    fam = f.family
    top_k = f.get("num_experts_per_tok", kind=int)
    if fam == "gpt_oss":
        from moe_runtime.core.hf.gpt_oss import gpt_oss_config
        return gpt_oss_config(f, kw, top_k, _moe_fields(f, top_k, True))
    if fam == "mixtral":
        f.expect("router_jitter_noise", 0.0, lambda v: v == 0, "router jitter is not implemented; set it to 0.0")
        moe = MoEConfig(num_experts=f.alias(("num_local_experts", "num_experts")),
                        d_expert=f.get("intermediate_size", kind=int), **_moe_fields(f, top_k, True))
        return ModelConfig(moe=moe, **kw)
    renorm = f.get("norm_topk_prob", False, bool)
    if fam == "olmoe":
        f.expect("attention_bias", False, lambda v: v is False, "biases on q/k/v/o projections are not modelled")
        f.expect("clip_qkv", None, lambda v: v is None, "q/k/v clipping is not implemented in core.model")
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
    if not isinstance(d, dict):
        raise HFCheckpointError(f"{file}: the top level is a {type(d).__name__}, expected a JSON object")
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
                                f"ignore_config_fields={tuple(unknown)} (Python) or "
                                f"{' '.join('--ignore-config-field ' + k for k in unknown)} (moe generate --hf)")
    return family, RunConfig(name=path.name, model=cfg, train=finetune_defaults(cfg.max_seq_len)), f


