"""The checkpoint manifest as typed records, with the structural checks every decoded field passes.

Every field read from a manifest (or a cluster shard-records file) goes through `field_of`, so a
wrong type, a missing key or an out-of-range value is a CheckpointError naming the file and field,
never an AttributeError / TypeError later. Shard file names must be plain names (no path, no '..').
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

MANIFEST = "manifest.msgpack"
FORMAT = "moe-runtime-checkpoint"
VERSION = 2
ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16",
             "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
"""torch dtype name (as in the manifest) -> safetensors header code."""
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,200}\.safetensors")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or of an unknown version; names the file."""


# ---------------------------------------------------------------- typed access to decoded dicts
def field_of(d: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """d[key] checked to be of `kind` (bools are not ints); CheckpointError naming `what` otherwise."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{what} is a {type(d).__name__}, expected a map")
    if key not in d:
        raise CheckpointError(f"{what} lacks field {key!r}")
    v = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        raise CheckpointError(f"{what}: field {key!r} is {type(v).__name__} {_short(v)}, expected "
                              f"{' or '.join(k.__name__ for k in kinds)}")
    return v


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _shape(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > 8 or not all(isinstance(s, int) and not isinstance(s, bool) and
                                                       0 <= s < 2**40 for s in v):
        raise CheckpointError(f"{what}: shape {_short(v)} is not a list of at most 8 non-negative ints")
    return tuple(v)


def _nonneg(v: int, key: str, what: str) -> int:
    if v < 0:
        raise CheckpointError(f"{what}: field {key!r}={v} must be >= 0")
    return v


def check_file_name(name: Any, what: str) -> str:
    """A shard file name: a plain *.safetensors name inside the checkpoint directory (no path)."""
    if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
        raise CheckpointError(f"{what}: shard file name {_short(name)} is not a plain <name>.safetensors "
                              f"inside the checkpoint directory (paths, '..' and absolute names are refused)")
    return name


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class ShardRecord:
    file: str
    key: str
    offset: int
    """First row of this shard along dim 0 of the global tensor."""
    shape: tuple[int, ...]
    crc32: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "key": self.key, "offset": self.offset, "shape": list(self.shape),
                "crc32": self.crc32}

    @classmethod
    def from_dict(cls, d: Any, what: str = "shard record") -> "ShardRecord":
        return cls(check_file_name(field_of(d, "file", str, what), what), field_of(d, "key", str, what),
                   _nonneg(field_of(d, "offset", int, what), "offset", what),
                   _shape(field_of(d, "shape", list, what), what),
                   _nonneg(field_of(d, "crc32", int, what), "crc32", what))


@dataclass(frozen=True)
class TensorRecord:
    global_shape: tuple[int, ...]
    dtype: str
    shards: tuple[ShardRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"global_shape": list(self.global_shape), "dtype": self.dtype,
                "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, d: Any, what: str = "tensor record") -> "TensorRecord":
        dtype = field_of(d, "dtype", str, what)
        if dtype not in ST_DTYPES:
            raise CheckpointError(f"{what}: dtype {dtype!r} is not one of {', '.join(ST_DTYPES)}")
        shards = field_of(d, "shards", list, what)
        rec = cls(_shape(field_of(d, "global_shape", list, what), what), dtype,
                  tuple(ShardRecord.from_dict(s, f"{what} shard {i}") for i, s in enumerate(shards)))
        rec.check_tiling(what)
        return rec

    def check_tiling(self, what: str) -> None:
        """The shards are row slices that tile the global shape exactly, in order."""
        g = self.global_shape
        if not self.shards:
            raise CheckpointError(f"{what} has no shards")
        if len(self.shards) == 1 and self.shards[0].shape == g and self.shards[0].offset == 0:
            return
        row = 0
        for s in self.shards:
            if not g or not s.shape or s.shape[1:] != g[1:] or s.offset != row:
                raise CheckpointError(f"{what}: shard of shape {list(s.shape)} at row {s.offset} does not tile "
                                      f"global shape {list(g)} (next row {row})")
            row += s.shape[0]
        if row != g[0]:
            raise CheckpointError(f"{what}: shards cover {row} rows of global shape {list(g)}")

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass(frozen=True)
class FileRecord:
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: Any, what: str) -> "FileRecord":
        digest = field_of(d, "sha256", str, what)
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise CheckpointError(f"{what}: sha256 {_short(digest)} is not 64 hex digits")
        return cls(_nonneg(field_of(d, "size", int, what), "size", what), digest)


@dataclass(frozen=True)
class Manifest:
    step: int
    config: dict[str, Any]
    train_state: dict[str, Any]
    tensors: dict[str, TensorRecord]
    files: dict[str, FileRecord]
    """Shard file name -> size and sha256 (filled in by `commit`)."""
    version: int = VERSION
    format: str = FORMAT
    layout: dict[str, Any] = field(default_factory=dict)
    """How it was written, e.g. {"world": 4, "ep": 4}; informational."""

    def to_dict(self) -> dict[str, Any]:
        """The sealed body (format and version travel in the envelope, see core/serial.py)."""
        return {"step": self.step, "config": self.config, "train_state": self.train_state, "layout": self.layout,
                "files": {k: v.to_dict() for k, v in self.files.items()},
                "tensors": {k: v.to_dict() for k, v in self.tensors.items()}}

    @classmethod
    def from_dict(cls, d: Any, what: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict):
            raise CheckpointError(f"{what} holds a {type(d).__name__}, expected a map")
        unknown = sorted(set(d) - {"step", "config", "train_state", "layout", "files", "tensors"})
        if unknown:
            raise CheckpointError(f"{what}: unknown field(s) {unknown}")
        step = _nonneg(field_of(d, "step", int, what), "step", what)
        config, state = field_of(d, "config", dict, what), field_of(d, "train_state", dict, what)
        if "step" in state and state["step"] != step:
            raise CheckpointError(f"{what}: train_state.step={_short(state['step'])} differs from step={step}")
        files = {check_file_name(k, f"{what} files"): FileRecord.from_dict(v, f"{what} files[{k!r}]")
                 for k, v in field_of(d, "files", dict, what).items()}
        tensors = {k: TensorRecord.from_dict(v, f"{what} tensor {k!r}")
                   for k, v in field_of(d, "tensors", dict, what).items()}
        for name, rec in tensors.items():
            for s in rec.shards:
                if s.file not in files:
                    raise CheckpointError(f"{what}: tensor {name!r} is in {s.file}, which `files` does not list")
        return cls(step=step, config=config, train_state=state, tensors=tensors, files=files,
                   layout=field_of(d, "layout", dict, what) if "layout" in d else {})


def tensor_crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
