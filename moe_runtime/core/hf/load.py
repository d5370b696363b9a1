"""Loading into MoETransformer, streaming experts, tokenizer, fine-tuning."""
from __future__ import annotations

import dataclasses
import math
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from safetensors import safe_open

from moe_runtime.core.config import ModelConfig, RunConfig, TrainConfig
from moe_runtime.core.data import TOKEN_SUFFIXES, Corpus
from moe_runtime.core.experts import ExpertBank
from moe_runtime.core.attention_variants import model_rotary_tables
from moe_runtime.core.model import MoETransformer
from moe_runtime.core.hf.config import TOKENIZER, HFCheckpointError, TRAIN_ONLY_MOE_FIELDS, _DTYPES
from moe_runtime.core.hf.plan import _Slot, _expert_names, _moe_prefix
from moe_runtime.core.hf.disk import HFCheckpoint, read_hf
from moe_runtime.core.hf.gpt_oss import deinterleave, dequantize_mx, mx_experts


# ---------------------------------------------------------------- loading
def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, load_experts: bool) -> MoETransformer:
    """The model with uninitialised storage (no random init); experts stay on meta unless load_experts."""
    with torch.device("meta"):
        model = MoETransformer(cfg).to(dtype)
    for module in model.modules():
        if load_experts or not isinstance(module, ExpertBank):
            module.to_empty(device=device, recurse=False)
        elif module.b13_EF2 is not None:  # gpt-oss expert biases: small, they stay with the dense weights
            module.b13_EF2 = torch.nn.Parameter(torch.empty_like(module.b13_EF2, device=device))
            module.b2_ED = torch.nn.Parameter(torch.empty_like(module.b2_ED, device=device))
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    cos, sin = model_rotary_tables(cfg)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    for layer in model.moe_layers():
        layer.router.bias_E = torch.zeros(cfg.moe.num_experts, device=device)
    return model


def _place(param: torch.Tensor, slot: _Slot, t: torch.Tensor) -> None:
    dst = param.data[slot.index] if slot.index else param.data
    if slot.deinterleave is not None:
        t = deinterleave(t, slot.deinterleave)
    dst.copy_(t.transpose(*slot.transpose) if slot.transpose else t)


def _read_mx(ck: HFCheckpoint, h, fp: Path, name: str, rows: slice | None, dtype: torch.dtype) -> torch.Tensor:
    """gpt-oss MXFP4 blocks + their scales (from whichever shard holds them) -> [n, K, O] float,
    gate/up de-interleaved for gate_up_proj. rows: only these experts leave the file(s)."""
    scales = name.removesuffix("_blocks") + "_scales"
    with ExitStack() as stack:
        sfp = ck.tensors[scales].file
        hs = h if sfp == fp else stack.enter_context(safe_open(str(sfp), framework="pt"))
        if rows is None:
            blocks, sc = h.get_tensor(name), hs.get_tensor(scales)
        else:
            blocks, sc = h.get_slice(name)[rows.start:rows.stop], hs.get_slice(scales)[rows.start:rows.stop]
    w = dequantize_mx(blocks, sc, dtype)
    return deinterleave(w, 2) if name.endswith("gate_up_proj_blocks") else w


@torch.no_grad()
def load_hf_weights(ck: HFCheckpoint, model: MoETransformer, *, expert_rows: slice | None = None
                    ) -> list[tuple[str, tuple[int, int] | None]]:
    """Stream every tensor of `ck` into `model`'s parameters in place, one shard file at a time.

    Expert parameters on the meta device are skipped (their data goes to an expert store instead).
    expert_rows: `model` is an expert-parallel rank's shard holding only these experts of every MoE
    layer (core.model.init_model(expert_rows=...)); other experts' tensors are never read, and a fused
    [E, ...] stack is read as the [rows] slice only. Returns what was read: (HF name, rows or None).
    """
    params = dict(model.named_parameters())
    expert_params = {s.param for s in ck.plan.values() if _is_expert(s.param)}
    E = ck.run.model.moe.num_experts
    share = 1.0 if expert_rows is None else (expert_rows.stop - expert_rows.start) / E
    for name, numel in _coverage(ck.plan).items():  # internal invariant: the plan fills every element
        want = numel * share if name in expert_params else numel
        assert params[name].numel() == want, f"tensor plan covers {want} of {params[name].numel()} in {name}"
    assert set(params) == set(_coverage(ck.plan)), "tensor plan and model parameters differ"
    read: list[tuple[str, tuple[int, int] | None]] = []
    for fp in ck.files:
        with safe_open(str(fp), framework="pt") as h:
            for name in h.keys():
                slot = ck.plan.get(name)
                if slot is None or params[slot.param].is_meta or slot.mx == "scales":
                    continue
                if slot.mx == "blocks":  # decoded with its scales; rows of an expert-parallel shard only
                    w = _read_mx(ck, h, fp, name, expert_rows, params[slot.param].dtype)
                    params[slot.param].data.copy_(w)
                    read.append((name, None if expert_rows is None else (expert_rows.start, expert_rows.stop)))
                elif expert_rows is None or slot.param not in expert_params:
                    _place(params[slot.param], slot, h.get_tensor(name))
                    read.append((name, None))
                elif not slot.index:  # fused [E, ...] stack: only this rank's rows leave the file
                    rows = h.get_slice(name)[expert_rows.start:expert_rows.stop]
                    _place(params[slot.param], slot, rows)
                    read.append((name, (expert_rows.start, expert_rows.stop)))
                elif expert_rows.start <= slot.index[0] < expert_rows.stop:  # per-expert tensor of mine
                    local = dataclasses.replace(slot, index=(slot.index[0] - expert_rows.start, *slot.index[1:]))
                    _place(params[slot.param], local, h.get_tensor(name))
                    read.append((name, (slot.index[0], slot.index[0] + 1)))
    return read


def _is_expert(param: str) -> bool:
    return param.endswith(("experts.w13_EDF2", "experts.w2_EFD", "experts.b13_EF2", "experts.b2_ED"))


def _coverage(plan: dict[str, _Slot]) -> dict[str, int]:
    out: dict[str, int] = {}
    for slot in plan.values():
        out[slot.param] = out.get(slot.param, 0) + (math.prod(slot.hf_shape) if slot.covers is None else slot.covers)
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
    model.hf_config = ck.hf_config  # export_hf writes back token ids, aux-loss coefficient, ...
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


def iter_hf_expert_tensors(path: str | Path | HFCheckpoint, *, dtype: torch.dtype | str | None = None,
                           max_seq_len: int | None = None, ignore_config_fields: tuple[str, ...] = (),
                           raw_mxfp4: bool = False) -> Iterator[Any]:
    """Yield every routed expert, layer-major, reading only that expert's bytes from its shard(s).

    Memory: one expert at a time (plus the OS page cache of the memory-mapped shards).
    raw_mxfp4: an MXFP4 gpt-oss checkpoint's experts come as (moe_layer, expert, QuantExperts bank of
    one) with the bytes as stored (gate/up rows de-interleaved) instead of dequantised HFExperts.
    Expert biases (gpt-oss) are not streamed: they load with the dense weights.
    """
    ck = path if isinstance(path, HFCheckpoint) else read_hf(path, max_seq_len=max_seq_len,
                                                             ignore_config_fields=ignore_config_fields)
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
                if ck.family == "gpt_oss":
                    yield _gpt_oss_expert(ck, read, moe, l, e, dt, raw_mxfp4)
                    continue
                if ck.layout == "fused":
                    w13 = read(moe + "gate_up_proj", e).T  # [2F, D] -> [D, 2F]
                    w2 = read(moe + "down_proj", e).T  # [D, F] -> [F, D]
                else:
                    x = f"{moe}{e}."
                    w13 = torch.cat([read(f"{x}{gate}.weight").T, read(f"{x}{up}.weight").T], dim=1)
                    w2 = read(f"{x}{down}.weight").T
                assert w13.shape == (cfg.d_model, 2 * F), w13.shape
                yield HFExpert(l, e, w13.to(dt).contiguous(), w2.to(dt).contiguous())


def _gpt_oss_expert(ck: HFCheckpoint, read, moe: str, l: int, e: int, dt: torch.dtype, raw: bool) -> Any:
    """One gpt-oss expert: float stacks de-interleaved, or MXFP4 decoded (raw: kept as bytes)."""
    if ck.layout != "mxfp4":
        return HFExpert(l, e, deinterleave(read(moe + "gate_up_proj", e), 1).to(dt).contiguous(),
                        read(moe + "down_proj", e).to(dt).contiguous())
    t = [read(moe + n, e)[None] for n in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks",
                                          "down_proj_scales")]
    if raw:
        return l, e, mx_experts(*t)
    w13 = deinterleave(dequantize_mx(t[0], t[1], dt)[0], 1)
    return HFExpert(l, e, w13.contiguous(), dequantize_mx(t[2], t[3], dt)[0].contiguous())


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
def hf_run_config(path: str | Path, train_config: TrainConfig | None = None, *,
                  moe_overrides: dict[str, Any] | None = None, max_seq_len: int | None = None,
                  ignore_config_fields: tuple[str, ...] = ()) -> tuple[HFCheckpoint, RunConfig]:
    """(the checkpoint, the RunConfig that fine-tunes it): the checkpoint's model with only the
    balance-loss options of moe_overrides changed, and train_config (default finetune_defaults)."""
    ck = read_hf(path, max_seq_len=max_seq_len, ignore_config_fields=ignore_config_fields)
    bad = sorted(set(moe_overrides or {}) - set(TRAIN_ONLY_MOE_FIELDS))
    if bad:
        raise ValueError(f"moe_overrides {bad} would change the checkpoint's math; only {TRAIN_ONLY_MOE_FIELDS} "
                         f"may be overridden when fine-tuning")
    cfg = ck.run.model
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **(moe_overrides or {})))
    return ck, RunConfig(name=ck.run.name, model=cfg, train=train_config or ck.run.train)


def hf_trainer_inputs(path: str | Path, train_config: TrainConfig | None = None, *,
                      moe_overrides: dict[str, Any] | None = None, max_seq_len: int | None = None,
                      ignore_config_fields: tuple[str, ...] = (), **trainer_kwargs: Any
                      ) -> tuple[HFCheckpoint, RunConfig, dict[str, Any]]:
    """What `Trainer.from_hf` builds a fine-tuning Trainer from: (checkpoint, run config, Trainer kwargs).

    train_config: default `finetune_defaults`. moe_overrides: balance-loss options only
    (TRAIN_ONLY_MOE_FIELDS), e.g. {"balance_coef": 0.01, "balance_scope": "global_batch"}.
    With a tokenizer.json, `data=` text is tokenized with it (token files pass through).
    The Trainer itself is made by core/train.py (this module never imports it: train -> hf, one way).
    """
    ck, run = hf_run_config(path, train_config, moe_overrides=moe_overrides, max_seq_len=max_seq_len,
                            ignore_config_fields=ignore_config_fields)
    tokenizer = load_tokenizer(ck.path)
    if tokenizer is not None:
        tokenized_data_kwargs(trainer_kwargs, lambda: tokenizer, run.model.vocab_size,
                              f"{ck.path} has a {TOKENIZER}")
    return ck, run, trainer_kwargs


def tokenized_data_kwargs(kw: dict[str, Any], tokenizer: Callable[[], Any], vocab_size: int, why: str) -> None:
    """Trainer keywords for a model with a tokenizer, in place: `data` text is encoded with it into a
    corpus, a token file (.bin/.npy) is kept as is, no data is an error (the default byte-level corpus
    does not match the vocabulary). `why` says where the tokenizer comes from."""
    if "corpus" in kw and kw["corpus"] is not None:
        return
    data = kw.pop("data", None)
    if data is None:
        raise ValueError(f"{why}: pass data= (--data) text to encode with it, or a token file; the default "
                         f"byte-level corpus does not match this vocabulary")
    if Path(data).suffix in TOKEN_SUFFIXES:
        kw["data"] = data
    else:
        kw["corpus"] = tokenized_corpus(tokenizer(), data, vocab_size)


