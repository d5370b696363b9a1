"""An independent restatement of the documented config rules (not core/config.py's code), the
fuzz tier's oracle for configs, which carry no digest: a mutated config the loader accepts must be
valid by this oracle, and one the oracle calls valid must load."""
from __future__ import annotations

import json
import math
import random
import re
from typing import Any

_OTHER_VALUES = [None, True, 1.5, -7, 2**40, "x", "", [], [1, 2], {}, {"a": 1}, b"\x00"]


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pos(v):
    return _int(v) and v > 0


def _nonneg_num(v):
    return _num(v) and v >= 0


_MOE = {"num_experts": lambda v: _int(v) and 1 <= v <= 65536, "top_k": _pos, "d_expert": _pos,
        "num_shared_experts": lambda v: _int(v) and v >= 0, "d_shared_expert": lambda v: v is None or (_int(v) and v >= 0),
        "shared_expert_gate": lambda v: isinstance(v, bool), "score_func": lambda v: v in ("softmax", "sigmoid"),
        "norm_topk_prob": lambda v: isinstance(v, bool), "balance_coef": _nonneg_num,
        "balance_scope": lambda v: v in ("micro_batch", "global_batch"), "global_sync": lambda v: v in ("exact", "cumulative"),
        "z_loss_coef": _nonneg_num, "aux_free_bias": lambda v: isinstance(v, bool), "bias_update_rate": _nonneg_num,
        "capacity_factor": lambda v: v is None or (_num(v) and v > 0),
        "router_position": lambda v: v in ("post_attention", "pre_attention"),
        "balance_pooling": lambda v: v in ("per_layer", "pooled"),
        "router_bias": lambda v: isinstance(v, bool), "expert_bias": lambda v: isinstance(v, bool),
        "expert_act": lambda v: v in ("swiglu", "clamped_swiglu"), "swiglu_alpha": _num,
        "swiglu_limit": lambda v: _num(v) and v > 0}
_MODEL = {"d_model": _pos, "n_layers": _pos, "n_heads": _pos, "vocab_size": _pos, "max_seq_len": _pos,
          "n_kv_heads": lambda v: v is None or _pos(v), "head_dim": lambda v: v is None or (_pos(v) and v % 2 == 0),
          "rope_theta": lambda v: _num(v) and v > 0, "norm_eps": lambda v: _num(v) and v > 0,
          "first_dense_layers": lambda v: _int(v) and v >= 0, "d_dense_ffn": lambda v: v is None or _pos(v),
          "tie_embeddings": lambda v: isinstance(v, bool), "qkv_bias": lambda v: isinstance(v, bool),
          "qk_norm": lambda v: v in (None, "full", "head"), "init_std": _nonneg_num,
          "o_bias": lambda v: isinstance(v, bool), "attn_sinks": lambda v: isinstance(v, bool),
          "sliding_window": lambda v: v is None or _pos(v), "window_layers": lambda v: v in ("all", "even", "odd"),
          "rope_yarn_factor": lambda v: v is None or (_num(v) and v > 0), "rope_yarn_original_max": _pos,
          "rope_yarn_beta_fast": lambda v: _num(v) and v > 0, "rope_yarn_beta_slow": lambda v: _num(v) and v > 0,
          "rope_yarn_truncate": lambda v: isinstance(v, bool),
          "tokenizer_sha256": lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None)}
_TRAIN = {**{k: _pos for k in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_interval",
                               "eval_interval")},
          "lr": lambda v: _num(v) and v > 0, "min_lr_ratio": lambda v: _num(v) and 0 <= v <= 1,
          "warmup_steps": lambda v: _int(v) and v >= 0, "weight_decay": _nonneg_num,
          "beta1": lambda v: _num(v) and 0 <= v < 1, "beta2": lambda v: _num(v) and 0 <= v < 1,
          "grad_clip": _nonneg_num, "seed": lambda v: _int(v) and 0 <= v < 2**63,
          "ckpt_interval": lambda v: _int(v) and v >= 0, "keep_checkpoints": _pos,
          "device": lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", v) is not None,
          "autocast_bf16": lambda v: isinstance(v, bool), "threads": lambda v: _int(v) and v >= 0,
          "activation_checkpointing": lambda v: v in ("none", "full", "selective")}
_REQUIRED = {"moe": ("num_experts", "top_k", "d_expert"), "model": ("d_model", "n_layers", "n_heads")}


def oracle_valid(d: Any) -> bool:
    """The documented config rules, restated independently of core/config.py."""
    if not isinstance(d, dict) or set(d) - {"name", "model", "train"} or not isinstance(d.get("name", ""), str):
        return False
    model, train = d.get("model"), d.get("train") or {}
    if not isinstance(model, dict) or not isinstance(train, dict) or not isinstance(model.get("moe"), dict):
        return False
    moe = model["moe"]
    for sec, spec, req in ((moe, _MOE, _REQUIRED["moe"]), ({k: v for k, v in model.items() if k != "moe"}, _MODEL,
                                                           _REQUIRED["model"]), (train, _TRAIN, ())):
        if set(sec) - set(spec) or any(k not in sec for k in req) or not all(spec[k](v) for k, v in sec.items()):
            return False
    m = lambda k, dflt: model.get(k) if model.get(k) is not None else dflt  # noqa: E731
    E, K, S = moe["num_experts"], moe["top_k"], moe.get("num_shared_experts", 0)
    dse = moe.get("d_shared_expert")
    dse = moe["d_expert"] * S if dse is None else dse
    H, kv = model["n_heads"], m("n_kv_heads", model["n_heads"])
    hd = model.get("head_dim")
    if hd is None and model["d_model"] % H:
        return False
    hd = hd if hd is not None else model["d_model"] // H
    return (K <= E and (S == 0 or dse > 0) and (not moe.get("shared_expert_gate", False) or S > 0) and hd > 0
            and hd % 2 == 0 and H % kv == 0 and m("first_dense_layers", 0) <= model["n_layers"]
            and train.get("seq_len", 128) <= m("max_seq_len", 256))


_RANGE_VALUES = [0, -1, 1, 2, 3, 7, 1.5, 0.0, -0.5, 1.0, 1e308, 2**63, float("inf"), float("nan"), "tpu", "softmax",
                 "cuda:1", True, False, None]


def mutate_config(d: dict[str, Any], kind: str, rng: random.Random) -> tuple[Any, str]:
    d = json.loads(json.dumps(d))
    sections = [(d["model"]["moe"], "model.moe"), (d["model"], "model"), (d["train"], "train")]
    sec, where = rng.choice(sections)
    key = rng.choice([k for k in sec if k != "moe"])
    if kind == "type_swap":
        v = rng.choice(_OTHER_VALUES[:-1])
        sec[key] = v
        return d, f"{where}.{key}={v!r}"
    if kind == "range":
        v = rng.choice(_RANGE_VALUES)
        sec[key] = v
        return d, f"{where}.{key}={v!r}"
    op = rng.choice(("top_list", "section_list", "missing", "unknown", "no_moe", "name"))
    if op == "top_list":
        return [d], op
    if op == "section_list":
        d[rng.choice(("model", "train"))] = [1, 2]
    elif op == "missing":
        del d["model"]["moe"][rng.choice(_REQUIRED["moe"])]
    elif op == "unknown":
        sec["n_expert" if where != "train" else "learning_rate"] = 3
    elif op == "no_moe":
        del d["model"]["moe"]
    else:
        d["name"] = rng.choice((3, None, ["a"]))
    return d, op
