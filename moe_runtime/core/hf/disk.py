"""The checkpoint on disk: shard discovery, safetensors headers, tensor checks."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moe_runtime.core.config import RunConfig
from moe_runtime.core.hf.config import CONFIG, INDEX, SINGLE, HFCheckpointError, _DTYPES, _Fields, _ST_DTYPES, _read_config
from moe_runtime.core.hf.plan import _Slot, tensor_plan


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
    hf_config: dict = field(default_factory=dict)
    """config.json as read (export_hf writes back the fields transformers uses that RunConfig lacks)."""


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise HFCheckpointError(f"{index}: not a valid index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise HFCheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.safetensors", file):
                raise HFCheckpointError(f"{index}: shard {file!r} (of {name}) is not a plain *.safetensors name in "
                                        f"the checkpoint directory (paths and '..' are refused)")
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


def _expert_layout(found: dict[str, _Found], path: Path, family: str) -> str:
    if family == "gpt_oss":  # always stacked: float (fused) or MXFP4 blocks / scales
        return "mxfp4" if any(n.endswith(".experts.gate_up_proj_blocks") for n in found) else "fused"
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
        if slot.st_dtype is not None:
            if t.dtype != slot.st_dtype:
                raise HFCheckpointError(f"{t.file}: tensor {name} has dtype {t.dtype}; MXFP4 blocks and scales are "
                                        f"{slot.st_dtype}")
        elif _ST_DTYPES.get(t.dtype) != dtype:
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
    layout = _expert_layout(found, path, family)
    dtype, dtype_source = _checkpoint_dtype(fields, found)
    try:
        plan = tensor_plan(family, run.model, layout)
    except ValueError as e:
        raise HFCheckpointError(f"{path}: {e}") from None
    _check_tensors(path, plan, found, dtype, dtype_source, run.model.tie_embeddings)
    return HFCheckpoint(path, family, run, dtype, layout, tuple(files), found, plan, dict(fields.d))


