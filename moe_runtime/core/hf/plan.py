"""The tensor plan: each Hugging Face tensor name -> our parameter, slice and shape."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


from moe_runtime.core.config import ModelConfig
from moe_runtime.core.hf.config import EXPERT_LAYOUTS, GPT_OSS_LAYOUTS


# ---------------------------------------------------------------- tensor plan (HF name -> our parameter)
@dataclass(frozen=True)
class _Slot:
    """Where one HF tensor lives in MoETransformer: param[index], with dims `transpose` swapped."""

    param: str
    hf_shape: tuple[int, ...]
    index: tuple = ()
    transpose: tuple[int, int] | None = None
    deinterleave: int | None = None
    """gpt-oss: the tensor's gate/up alternate along this dim; placed as [gate | up]."""
    mx: str | None = None
    """gpt-oss MXFP4: 'blocks' (decoded together with its '<name>_scales' tensor) or 'scales'."""
    st_dtype: str | None = None
    """The safetensors dtype this tensor must have (default: the checkpoint's float dtype)."""
    covers: int | None = None
    """Elements of `param` this tensor fills (default: its own element count)."""


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
    if cfg.o_bias:
        plan[hf + "o_proj.bias"] = _whole(ours + "wo.bias", D)
    if cfg.attn_sinks:
        plan[hf + "sinks"] = _whole(ours + "sinks", cfg.n_heads)
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


def _gpt_oss_moe_plan(layout: str, block: int, cfg: ModelConfig) -> dict[str, _Slot]:
    """gpt-oss: router with bias; fused experts with biases, gate/up interleaved along 2F; float or MXFP4."""
    E, F, D = cfg.moe.num_experts, cfg.moe.d_expert, cfg.d_model
    hf, ours = f"model.layers.{block}.mlp.", f"blocks.{block}.ffn."
    x = hf + "experts."
    plan = {hf + "router.weight": _whole(ours + "router.weight_ED", E, D),
            hf + "router.bias": _whole(ours + "router.logit_bias_E", E),
            x + "gate_up_proj_bias": _Slot(ours + "experts.b13_EF2", (E, 2 * F), deinterleave=1),
            x + "down_proj_bias": _whole(ours + "experts.b2_ED", E, D)}
    w13, w2 = ours + "experts.w13_EDF2", ours + "experts.w2_EFD"
    if layout != "mxfp4":
        plan[x + "gate_up_proj"] = _Slot(w13, (E, D, 2 * F), deinterleave=2)
        plan[x + "down_proj"] = _whole(w2, E, F, D)
        return plan
    if D % 32 or F % 32:
        raise ValueError(f"MXFP4 experts need hidden_size ({D}) and intermediate_size ({F}) to be multiples of 32")
    for name, O, K, param in (("gate_up_proj", 2 * F, D, w13), ("down_proj", D, F, w2)):
        plan[x + name + "_blocks"] = _Slot(param, (E, O, K // 32, 16), mx="blocks", st_dtype="U8", covers=E * O * K)
        plan[x + name + "_scales"] = _Slot(param, (E, O, K // 32), mx="scales", st_dtype="U8", covers=0)
    return plan


def _moe_plan(family: str, layout: str, block: int, cfg: ModelConfig) -> dict[str, _Slot]:
    if family == "gpt_oss":
        return _gpt_oss_moe_plan(layout, block, cfg)
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
    if layout not in (GPT_OSS_LAYOUTS if family == "gpt_oss" else EXPERT_LAYOUTS):
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


