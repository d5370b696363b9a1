"""Export to the Hugging Face layout that transformers loads."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moe_runtime.core.config import ModelConfig, RunConfig
from moe_runtime.core.model import MoETransformer
from moe_runtime.core.hf.config import CONFIG, INDEX, SINGLE, TOKENIZER, FAMILY_ARCH
from moe_runtime.core.hf.plan import _Slot, tensor_plan
from moe_runtime.core.hf.load import _as_dtype


# ---------------------------------------------------------------- export
def _family_problems(cfg: ModelConfig, family: str) -> list[str]:
    """Why cfg cannot be written as `family` (empty: it can, with identical math)."""
    m, p = cfg.moe, []
    if family == "gpt_oss":
        return ["export as gpt_oss is not implemented (gpt-oss checkpoints load; they do not write back)"]
    gpt_oss = {"o_bias": cfg.o_bias, "attn_sinks": cfg.attn_sinks, "sliding_window": cfg.sliding_window,
               "rope_yarn_factor": cfg.rope_yarn_factor, "router_bias": m.router_bias, "expert_bias": m.expert_bias,
               "expert_act": m.expert_act if m.expert_act != "swiglu" else None}
    p += [f"{k}={v!r} (gpt-oss only)" for k, v in gpt_oss.items() if v not in (None, False)]
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


# Fields of a loaded config.json that transformers uses but RunConfig does not hold (or holds only in
# training form): written back so that load -> export -> load is identical and generate() stops alike.
PASSTHROUGH = ("bos_token_id", "eos_token_id", "pad_token_id", "router_aux_loss_coef", "output_router_logits",
               "tokenizer_class", "id2label", "label2id", "max_window_layers", "layer_types", "rope_scaling",
               "use_sliding_window", "sliding_window", "max_position_embeddings", "rope_parameters")


def read_back(source: dict[str, Any], cfg: ModelConfig, family: str) -> dict[str, Any]:
    """The PASSTHROUGH fields of the config.json the model was loaded from (same family only)."""
    if source.get("model_type") != family:
        return {}
    out = {k: source[k] for k in PASSTHROUGH if k in source}
    if out.get("max_position_embeddings", cfg.max_seq_len) < cfg.max_seq_len:
        out.pop("max_position_embeddings")  # the model was extended past it: ours is the truth
    if isinstance(out.get("rope_parameters"), dict) and out["rope_parameters"].get("rope_theta") != cfg.rope_theta:
        out.pop("rope_parameters")
    return out


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
    source = getattr(model, "hf_config", None) or {}
    config = {**hf_config(cfg, family, dt), **read_back(source, cfg, family), **(extra_config or {})}
    if source and "head_dim" not in source and cfg.head_dim == cfg.d_model // cfg.n_heads:
        config.pop("head_dim")  # transformers derives it; the loaded config.json did not carry it
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
