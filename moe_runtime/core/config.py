"""Configs: one dataclass per component, validated at construction, plus a preset registry.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, L layers.

Files: `load_config(path)` reads TOML or JSON with the sections `[model]`, `[model.moe]`
and `[train]`; unknown keys are refused (a typo must not silently train the wrong model).
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_runtime.core.validate import (ConfigError, _at_least, _build, _check, _check_types, _choice, _known_keys,  # noqa: F401
                           _positive, _section, _field_names)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

SCORE_FUNCS = ("softmax", "sigmoid")
EXPERT_ACTS = ("swiglu", "clamped_swiglu")
WINDOW_LAYERS = ("all", "even", "odd")
BALANCE_SCOPES = ("micro_batch", "global_batch")
GLOBAL_SYNCS = ("exact", "cumulative")
ROUTER_POSITIONS = ("post_attention", "pre_attention")


BALANCE_POOLINGS = ("per_layer", "pooled")
MAX_CONFIG_BYTES = 1 << 20
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d{1,3})?")


@dataclass(kw_only=True)
class MoEConfig:
    """The mixture-of-experts FFN and its router."""

    num_experts: int
    """E: routed experts per MoE layer."""
    top_k: int
    """K: experts each token is sent to."""
    d_expert: int
    """F: hidden size of one routed expert's SwiGLU MLP."""
    num_shared_experts: int = 0
    """Experts every token passes through (DeepSeek / Qwen2-MoE style), fused into one MLP."""
    d_shared_expert: int | None = None
    """Hidden size of the fused shared MLP; default d_expert * num_shared_experts."""
    shared_expert_gate: bool = False
    """Scale the shared MLP by sigmoid(x @ w_gate) per token (Qwen2-MoE)."""
    score_func: str = "softmax"
    """Router scores: 'softmax' over experts or per-expert 'sigmoid'."""
    norm_topk_prob: bool = True
    """Renormalise the K selected weights to sum to 1."""
    balance_coef: float = 0.01
    """Weight of the load-balancing loss N_E * sum_i f_i * p_i (0 disables it)."""
    balance_scope: str = "global_batch"
    """'micro_batch': f_i from the micro-batch; 'global_batch': f_i over the whole optimizer step."""
    global_sync: str = "exact"
    """How global-batch f_i is formed over accumulation micro-batches: 'exact' or 'cumulative' (see core/router.py)."""
    z_loss_coef: float = 0.0
    """Router z-loss weight: mean(logsumexp(logits)^2)."""
    aux_free_bias: bool = False
    """DeepSeek-V3 aux-loss-free balancing: per-expert bias used for top-k selection only."""
    bias_update_rate: float = 1e-3
    """Step size of the aux-free bias update (sign of mean load minus load)."""
    capacity_factor: float | None = None
    """Comparison only: drop tokens past capacity = ceil(cf * T * K / E). None = dropless (default)."""
    router_position: str = "post_attention"
    """'pre_attention' routes from the block input so inference can fetch experts during attention."""
    balance_pooling: str = "per_layer"
    """'per_layer': mean over layers of N_E * sum_i f_i p_i; 'pooled': f and p pooled over all layers
    first (transformers' load_balancing_loss_func; used when fine-tuning a Hugging Face checkpoint)."""
    router_bias: bool = False
    """A learned bias on the router logits (gpt-oss); it changes selection and weights alike."""
    expert_bias: bool = False
    """Biases on each routed expert's W13 and W2 outputs (gpt-oss)."""
    expert_act: str = "swiglu"
    """Routed experts' activation: 'swiglu' silu(g) * u, or 'clamped_swiglu' (gpt-oss)
    (u.clamp(-limit, limit) + 1) * g' * sigmoid(alpha * g') with g' = g.clamp(max=limit)."""
    swiglu_alpha: float = 1.702
    """clamped_swiglu: the sigmoid's gain alpha."""
    swiglu_limit: float = 7.0
    """clamped_swiglu: the clamp limit."""

    def __post_init__(self) -> None:
        _check_types(self)
        _positive("num_experts", self.num_experts)
        _check(self.num_experts <= 65536, f"num_experts={self.num_experts} must be <= 65536 (routing traces store "
                                          f"expert ids as uint16)")
        _positive("d_expert", self.d_expert)
        _check(1 <= self.top_k <= self.num_experts,
               f"top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        _check(self.num_shared_experts >= 0, f"num_shared_experts={self.num_shared_experts} must be >= 0")
        _at_least("d_shared_expert", self.d_shared_expert, 0)
        if self.d_shared_expert is None:
            self.d_shared_expert = self.d_expert * self.num_shared_experts
        _check(self.num_shared_experts == 0 or self.d_shared_expert > 0,
               f"d_shared_expert={self.d_shared_expert} must be > 0 when num_shared_experts > 0")
        _check(not self.shared_expert_gate or self.num_shared_experts > 0,
               "shared_expert_gate=True needs num_shared_experts >= 1")
        _choice("score_func", self.score_func, SCORE_FUNCS)
        _choice("balance_scope", self.balance_scope, BALANCE_SCOPES)
        _choice("global_sync", self.global_sync, GLOBAL_SYNCS)
        _choice("router_position", self.router_position, ROUTER_POSITIONS)
        _choice("balance_pooling", self.balance_pooling, BALANCE_POOLINGS)
        _choice("expert_act", self.expert_act, EXPERT_ACTS)
        _positive("swiglu_limit", self.swiglu_limit)
        _check(self.balance_coef >= 0, f"balance_coef={self.balance_coef} must be >= 0")
        _check(self.z_loss_coef >= 0, f"z_loss_coef={self.z_loss_coef} must be >= 0")
        _check(self.bias_update_rate >= 0, f"bias_update_rate={self.bias_update_rate} must be >= 0")
        _check(self.capacity_factor is None or self.capacity_factor > 0,
               f"capacity_factor={self.capacity_factor} must be > 0, or None for dropless")


@dataclass(kw_only=True)
class ModelConfig:
    """A decoder-only MoE language model."""

    d_model: int
    """D: residual stream width."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Query heads."""
    moe: MoEConfig
    """The MoE FFN used by every layer past first_dense_layers."""
    vocab_size: int = 256
    """Token ids are in [0, vocab_size); 256 = bytes."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); default n_heads."""
    head_dim: int | None = None
    """Width of one attention head; default d_model // n_heads (Qwen3-MoE uses 128 with d_model 2048, 32 heads)."""
    max_seq_len: int = 256
    """Longest sequence (rotary table size)."""
    rope_theta: float = 10000.0
    """Rotary base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    first_dense_layers: int = 0
    """Leading blocks with a dense SwiGLU FFN instead of MoE (DeepSeek style)."""
    d_dense_ffn: int | None = None
    """Hidden size of the dense FFN; default 4 * d_model * 2 / 3 rounded to 8."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head."""
    qkv_bias: bool = False
    """Biases on the query/key/value projections (Qwen2-MoE)."""
    qk_norm: str | None = None
    """RMSNorm on queries and keys: None, 'full' (over all heads at once, OLMoE) or 'head' (per head, Qwen3)."""
    init_std: float = 0.02
    """Std of the normal initialisation."""
    o_bias: bool = False
    """A bias on the attention output projection (gpt-oss)."""
    attn_sinks: bool = False
    """A learned logit per query head added to each softmax's denominator (gpt-oss attention sinks)."""
    sliding_window: int | None = None
    """Keys a query sees in sliding-window layers, itself included (None: full attention everywhere)."""
    window_layers: str = "all"
    """Which layers slide when sliding_window is set: 'all', 'even' (0, 2, ...; gpt-oss) or 'odd'."""
    rope_yarn_factor: float | None = None
    """YaRN RoPE scaling factor (gpt-oss: 32); None = plain RoPE. The yarn fields follow transformers."""
    rope_yarn_original_max: int = 4096
    """YaRN: the pre-training context length (original_max_position_embeddings)."""
    rope_yarn_beta_fast: float = 32.0
    """YaRN: rotations bounding the extrapolated dims (beta_fast)."""
    rope_yarn_beta_slow: float = 1.0
    """YaRN: rotations bounding the interpolated dims (beta_slow)."""
    rope_yarn_truncate: bool = True
    """YaRN: round the correction range to whole dims (gpt-oss: False)."""
    tokenizer_sha256: str | None = None
    """sha256 of the tokenizer.json the model was trained with (`moe train --tokenizer`); None = bytes
    or ids from elsewhere. `moe generate` / `moe serve` look for that file next to the checkpoint."""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        _check(isinstance(self.moe, MoEConfig), f"moe={self.moe!r} must be a MoEConfig or a table of its fields")
        _check_types(self, skip=("moe",))
        for name in ("d_model", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            _positive(name, getattr(self, name))
        _check(self.n_kv_heads is None or self.n_kv_heads > 0, f"n_kv_heads={self.n_kv_heads} must be > 0")
        _check(self.head_dim is None or self.head_dim > 0, f"head_dim={self.head_dim} must be > 0")
        _check(self.d_dense_ffn is None or self.d_dense_ffn > 0, f"d_dense_ffn={self.d_dense_ffn} must be > 0")
        _positive("rope_theta", self.rope_theta)
        _positive("norm_eps", self.norm_eps)
        _at_least("init_std", self.init_std, 0)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            _check(self.d_model % self.n_heads == 0,
                   f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                   f"choose d_model a multiple of n_heads or set head_dim")
            self.head_dim = self.d_model // self.n_heads
        _check(self.head_dim > 0 and self.head_dim % 2 == 0,
               f"head_dim={self.head_dim} must be a positive even number for rotary embeddings")
        _check(self.n_heads % self.n_kv_heads == 0,
               f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
               f"grouped-query attention needs a divisor of n_heads")
        _check(0 <= self.first_dense_layers <= self.n_layers,
               f"first_dense_layers={self.first_dense_layers} must be between 0 and n_layers={self.n_layers}")
        _check(self.qk_norm in (None, "full", "head"),
               f"qk_norm={self.qk_norm!r} must be None, 'full' or 'head'")
        _check(self.tokenizer_sha256 is None or re.fullmatch(r"[0-9a-f]{64}", self.tokenizer_sha256) is not None,
               f"tokenizer_sha256={self.tokenizer_sha256!r} must be None or 64 lowercase hex digits")
        _check(self.sliding_window is None or self.sliding_window >= 1,
               f"sliding_window={self.sliding_window} must be >= 1 (or None for full attention)")
        _choice("window_layers", self.window_layers, WINDOW_LAYERS)
        _check(self.rope_yarn_factor is None or self.rope_yarn_factor > 0,
               f"rope_yarn_factor={self.rope_yarn_factor} must be > 0 (or None for plain RoPE)")
        _positive("rope_yarn_original_max", self.rope_yarn_original_max)
        _positive("rope_yarn_beta_fast", self.rope_yarn_beta_fast)
        _positive("rope_yarn_beta_slow", self.rope_yarn_beta_slow)
        if self.d_dense_ffn is None:
            self.d_dense_ffn = max(8, int(8 * self.d_model / 3) // 8 * 8)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of block `layer`, or None (full causal attention)."""
        if self.sliding_window is None or (self.window_layers == "even" and layer % 2) or \
                (self.window_layers == "odd" and layer % 2 == 0):
            return None
        return self.sliding_window

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.n_layers - self.first_dense_layers


@dataclass(kw_only=True)
class TrainConfig:
    """Optimisation, data and bookkeeping for Trainer."""

    max_steps: int = 600
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch, over all workers (each of W cluster workers takes batch_size / W)."""
    seq_len: int = 128
    """Tokens per sequence."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr."""
    warmup_steps: int = 30
    """Linear warm-up steps."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not on norms, biases, embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global grad norm to this (0 disables)."""
    seed: int = 0
    """Seeds initialisation and batch sampling."""
    eval_interval: int = 100
    """Steps between validation runs (and at the end)."""
    eval_batches: int = 8
    """Validation micro-batches per evaluation."""
    log_interval: int = 10
    """Steps between metric lines."""
    ckpt_interval: int = 200
    """Steps between checkpoints (and at the end); 0 = only at the end."""
    keep_checkpoints: int = 2
    """Newest checkpoints kept on disk."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1' ..."""
    autocast_bf16: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 = torch's default."""
    activation_checkpointing: str = "none"
    """'none'; 'full': recompute each block in backward; 'selective': recompute only attention."""

    def __post_init__(self) -> None:
        _check_types(self)
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_interval",
                     "eval_interval"):
            _positive(name, getattr(self, name))
        _positive("lr", self.lr)
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _check(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        _check(self.ckpt_interval >= 0, f"ckpt_interval={self.ckpt_interval} must be >= 0")
        _check(self.keep_checkpoints >= 1, f"keep_checkpoints={self.keep_checkpoints} must be >= 1")
        _check(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0")
        _at_least("weight_decay", self.weight_decay, 0)
        _at_least("threads", self.threads, 0)
        _check(0 <= self.seed < 2**63, f"seed={self.seed} must be in [0, 2**63)")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"{name}={getattr(self, name)} must be in [0, 1)")
        _check(bool(DEVICE_PATTERN.fullmatch(self.device)),
               f"device={self.device!r} is not one of auto, cpu, cuda, cuda:N, mps")
        _check(self.activation_checkpointing in ("none", "full", "selective"),
               f"activation_checkpointing={self.activation_checkpointing!r} must be 'none', 'full' or 'selective'")


@dataclass(kw_only=True)
class RunConfig:
    """A model and how to train it: what a preset or a config file names."""

    name: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str), f"name={self.name!r} must be a str")
        _check(isinstance(self.model, ModelConfig) and isinstance(self.train, TrainConfig),
               "model and train must be a ModelConfig and a TrainConfig")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "config") -> "RunConfig":
        """Validate a nested dict (from TOML, JSON, a checkpoint manifest) into a RunConfig.
        Every error is one ConfigError naming source, the section and key, the value and what is expected."""
        _check(isinstance(d, dict), f"{source}: the top level is a {type(d).__name__}, expected a table/object with "
                                    f"[model], [model.moe] and [train]")
        _known_keys(d, {"name", "model", "train"}, source)
        model = _section(d, "model", source, required=True)
        _known_keys(model, _field_names(ModelConfig), f"{source} [model]")
        moe = _section(model, "moe", source, required=True, where="model.moe")
        _known_keys(moe, _field_names(MoEConfig), f"{source} [model.moe]")
        train = _section(d, "train", source, required=False)
        _known_keys(train, _field_names(TrainConfig), f"{source} [train]")
        name = d.get("name", "custom")
        _check(isinstance(name, str), f"{source}: name={name!r} must be a str")
        m = _build(MoEConfig, moe, source, "model.moe")
        run = _build(cls, dict(name=name, model=_build(ModelConfig, {**model, "moe": m}, source, "model"),
                               train=_build(TrainConfig, train, source, "train")), source, "")
        _check(run.train.seq_len <= run.model.max_seq_len,
               f"{source}: train.seq_len={run.train.seq_len} exceeds model.max_seq_len={run.model.max_seq_len}; "
               f"lower seq_len or raise max_seq_len")
        return run


def load_config(path: str | Path) -> RunConfig:
    """Read a RunConfig from a .toml or .json file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass an existing .toml or .json file")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {p} is {p.stat().st_size} bytes, over the {MAX_CONFIG_BYTES}-byte limit "
                          f"for a config")
    try:
        if p.suffix == ".toml":
            d = tomllib.loads(p.read_text())
        elif p.suffix == ".json":
            d = json.loads(p.read_text())
        else:
            raise ConfigError(f"config file {p} must end in .toml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"config file {p} is not valid {p.suffix[1:].upper()}: {str(e)[:200]}") from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read ({e.strerror})") from None
    if isinstance(d, dict):
        d.setdefault("name", p.stem)
    return RunConfig.from_dict(d, source=str(p))


# ---------------------------------------------------------------- presets
def _tiny() -> RunConfig:
    return RunConfig(
        name="tiny",
        model=ModelConfig(d_model=128, n_layers=4, n_heads=4, max_seq_len=128,
                          moe=MoEConfig(num_experts=8, top_k=2, d_expert=128, num_shared_experts=1,
                                        d_shared_expert=128)),
        train=TrainConfig(max_steps=300, batch_size=16, seq_len=128, grad_accum=1, lr=3e-3,
                          warmup_steps=20, eval_interval=100, ckpt_interval=100, log_interval=10))


def _small() -> RunConfig:
    return RunConfig(
        name="small",
        model=ModelConfig(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, max_seq_len=512,
                          first_dense_layers=1,
                          moe=MoEConfig(num_experts=32, top_k=4, d_expert=256, num_shared_experts=1,
                                        d_shared_expert=512)),
        train=TrainConfig(max_steps=2000, batch_size=16, seq_len=512, grad_accum=2, lr=1e-3,
                          warmup_steps=100, eval_interval=250, ckpt_interval=500))


def _mixtral_8x7b() -> RunConfig:
    return RunConfig(
        name="mixtral-8x7b",
        model=ModelConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                          max_seq_len=4096, rope_theta=1e6,
                          moe=MoEConfig(num_experts=8, top_k=2, d_expert=14336)),
        train=TrainConfig(batch_size=1, seq_len=4096, lr=1e-4))


def _qwen3_30b_a3b() -> RunConfig:
    return RunConfig(
        name="qwen3-30b-a3b",
        model=ModelConfig(vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
                          max_seq_len=4096, rope_theta=1e6, qk_norm="head",
                          moe=MoEConfig(num_experts=128, top_k=8, d_expert=768)),
        train=TrainConfig(batch_size=1, seq_len=4096, lr=1e-4))


def _olmoe_1b_7b() -> RunConfig:
    return RunConfig(
        name="olmoe-1b-7b",
        model=ModelConfig(vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, max_seq_len=4096, qk_norm="full",
                          moe=MoEConfig(num_experts=64, top_k=8, d_expert=1024, norm_topk_prob=False)),
        train=TrainConfig(batch_size=1, seq_len=4096, lr=1e-4))


PRESETS = {
    "tiny": _tiny,
    "small": _small,
    "mixtral-8x7b": _mixtral_8x7b,
    "qwen3-30b-a3b": _qwen3_30b_a3b,
    "olmoe-1b-7b": _olmoe_1b_7b,
}


def get_preset(name: str) -> RunConfig:
    """A fresh RunConfig for a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def param_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts: total, active per token, and expert-only."""
    D, m = cfg.d_model, cfg.moe
    attn = D * cfg.head_dim * (cfg.n_heads * 2 + cfg.n_kv_heads * 2)
    attn += 2 * cfg.head_dim * (1 if cfg.qk_norm == "head" else 0) + (cfg.n_heads + cfg.n_kv_heads) * cfg.head_dim * (
        1 if cfg.qk_norm == "full" else 0)
    attn += (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim if cfg.qkv_bias else 0
    attn += (D if cfg.o_bias else 0) + (cfg.n_heads if cfg.attn_sinks else 0)
    expert = 3 * D * m.d_expert + ((2 * m.d_expert + D) if m.expert_bias else 0)
    shared = 3 * D * m.d_shared_expert + (D if m.shared_expert_gate else 0)
    moe_layer = m.num_experts * expert + shared + (D + (1 if m.router_bias else 0)) * m.num_experts
    dense_layer = 3 * D * cfg.d_dense_ffn
    emb = cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    L_moe, L_dense = cfg.num_moe_layers, cfg.first_dense_layers
    total = emb + cfg.n_layers * (attn + 2 * D) + L_moe * moe_layer + L_dense * dense_layer + D
    active = total - L_moe * (m.num_experts - m.top_k) * expert
    return {"total": total, "active": active, "experts": L_moe * m.num_experts * expert,
            "flops_per_token": 6 * active}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["ConfigError", "MoEConfig", "ModelConfig", "TrainConfig", "RunConfig", "PRESETS", "get_preset", "load_config",
           "param_count", "ceil_div"]
