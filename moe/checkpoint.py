"""Checkpoints: safetensors shards + a msgpack manifest, written atomically, reshardable.

Layout of one checkpoint (one directory per step):

    <root>/step_00000200/
        model-rank00000.safetensors     tensors owned by rank 0 (dense part, its experts)
        model-rank00001.safetensors     ... one file per owner
        manifest.msgpack                written LAST, then the directory is renamed into place

Every tensor is described in the manifest by its global shape and a list of shards (file, key,
offset along dim 0, shape, crc32). A tensor split over expert-parallel ranks is stored as row
slices of its global [E, ...] shape, so a checkpoint written with EP=a loads with EP=b: the
reader assembles or slices rows as asked. Writing goes to `.tmp-step_NNNNNNNN`, and only a
complete directory with a manifest is ever renamed to `step_NNNNNNNN`, so a crash at any point
leaves the previous checkpoint as the newest valid one.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from moe.serial import unpack_limited

MANIFEST = "manifest.msgpack"
FORMAT = "moe-runtime-checkpoint"
VERSION = 1
MAX_MANIFEST_BYTES = 256 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or of an unknown version."""


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
    def from_dict(cls, d: dict[str, Any]) -> "ShardRecord":
        return cls(str(d["file"]), str(d["key"]), int(d["offset"]), tuple(int(s) for s in d["shape"]),
                   int(d["crc32"]))


@dataclass(frozen=True)
class TensorRecord:
    global_shape: tuple[int, ...]
    dtype: str
    shards: tuple[ShardRecord, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"global_shape": list(self.global_shape), "dtype": self.dtype,
                "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorRecord":
        return cls(tuple(int(s) for s in d["global_shape"]), str(d["dtype"]),
                   tuple(ShardRecord.from_dict(s) for s in d["shards"]))


@dataclass(frozen=True)
class Manifest:
    step: int
    config: dict[str, Any]
    train_state: dict[str, Any]
    tensors: dict[str, TensorRecord]
    files: dict[str, int]
    """File name -> size in bytes (truncation check)."""
    version: int = VERSION
    format: str = FORMAT
    layout: dict[str, Any] = field(default_factory=dict)
    """How it was written, e.g. {"world": 4, "ep": 4}; informational."""

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "version": self.version, "step": self.step, "config": self.config,
                "train_state": self.train_state, "layout": self.layout, "files": self.files,
                "tensors": {k: v.to_dict() for k, v in self.tensors.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if d.get("format") != FORMAT:
            raise CheckpointError(f"manifest format {d.get('format')!r} is not {FORMAT!r}")
        if d.get("version") != VERSION:
            raise CheckpointError(f"manifest version {d.get('version')} is not supported (this build reads "
                                  f"version {VERSION}); upgrade moe-runtime")
        return cls(step=int(d["step"]), config=d["config"], train_state=d["train_state"],
                   tensors={k: TensorRecord.from_dict(v) for k, v in d["tensors"].items()},
                   files={k: int(v) for k, v in d["files"].items()}, layout=d.get("layout", {}))


def tensor_crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".tmp-{step_dir_name(step)}"


def write_shard_file(tmp_dir: Path, file: str, tensors: dict[str, torch.Tensor],
                     offsets: dict[str, int] | None = None) -> dict[str, ShardRecord]:
    """Write one owner's tensors to tmp_dir/file; return a shard record per tensor name.

    offsets[name] is the first global row of a row-sliced tensor (0 / absent: not sliced).
    """
    offsets = offsets or {}
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    keys = {name: name.replace("/", ".") for name in cpu}
    save_file({keys[n]: t for n, t in cpu.items()}, str(tmp_dir / file))
    return {n: ShardRecord(file, keys[n], offsets.get(n, 0), tuple(t.shape), tensor_crc32(t)) for n, t in cpu.items()}


def merge_records(shard_maps: list[dict[str, ShardRecord]], global_shapes: dict[str, tuple[int, ...]],
                  dtypes: dict[str, str]) -> dict[str, TensorRecord]:
    """Group every owner's shard records by tensor name, checking they tile the global rows."""
    by_name: dict[str, list[ShardRecord]] = {}
    for m in shard_maps:
        for name, rec in m.items():
            by_name.setdefault(name, []).append(rec)
    out = {}
    for name, recs in by_name.items():
        recs.sort(key=lambda r: r.offset)
        gshape = tuple(global_shapes[name])
        rows = sum(r.shape[0] if r.shape else 1 for r in recs)
        if len(recs) > 1 and rows != gshape[0]:
            raise CheckpointError(f"shards of {name} cover {rows} rows, global shape {gshape}")
        out[name] = TensorRecord(gshape, dtypes[name], tuple(recs))
    return out


def commit(root: Path, manifest: Manifest, keep: int | None = None) -> Path:
    """Write the manifest into the step's temp dir, fsync, and rename it into place (atomic)."""
    tmp, final = tmp_dir_for(root, manifest.step), root / step_dir_name(manifest.step)
    files = {f: (tmp / f).stat().st_size for f in sorted({s.file for t in manifest.tensors.values() for s in t.shards})}
    manifest = dataclasses.replace(manifest, files=files)
    data = msgpack.packb(manifest.to_dict(), use_bin_type=True)
    with open(tmp / MANIFEST, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if final.exists():  # re-saving a step (e.g. after recovery) replaces the old copy
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    if keep is not None:
        prune(root, keep)
    return final


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Write a manifest whose `files` sizes the caller already knows (shards written by other
    processes, e.g. ranks of a Ray Train job whose directories are merged on upload); fsynced."""
    data = msgpack.packb(manifest.to_dict(), use_bin_type=True)
    with open(Path(directory) / MANIFEST, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(root: str | Path, step: int, tensors: dict[str, torch.Tensor], config: dict[str, Any],
                    train_state: dict[str, Any], keep: int | None = None) -> Path:
    """Single-owner save: every tensor in one safetensors file."""
    root = Path(root)
    tmp = prepare_tmp(root, step)
    recs = write_shard_file(tmp, "model-rank00000.safetensors", tensors)
    records = merge_records([recs], {n: tuple(t.shape) for n, t in tensors.items()},
                            {n: str(t.dtype).removeprefix("torch.") for n, t in tensors.items()})
    return commit(root, Manifest(step=step, config=config, train_state=train_state, tensors=records, files={},
                                 layout={"world": 1}), keep)


def prepare_tmp(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir_for(root, step)
    if tmp.exists():  # leftovers of a crashed save of the same step
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it was not completely written")
    raw = mf.read_bytes()
    try:
        d = unpack_limited(raw, MAX_MANIFEST_BYTES, str(mf))
        if not isinstance(d, dict):
            raise CheckpointError(f"{mf} does not hold a map")
        manifest = Manifest.from_dict(d)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mf} is corrupted ({type(e).__name__}: {e}); use an earlier checkpoint") from None
    for f, size in manifest.files.items():
        fp = path / f
        if not fp.is_file():
            raise CheckpointError(f"checkpoint {path}: shard file {f} is missing")
        if fp.stat().st_size != size:
            raise CheckpointError(f"checkpoint {path}: shard file {f} is {fp.stat().st_size} bytes, the manifest "
                                  f"says {size}: it is truncated or was overwritten")
    return manifest


class Checkpoint:
    """A validated checkpoint directory. Tensors are read lazily and their checksums verified."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)

    @property
    def step(self) -> int:
        return self.manifest.step

    def names(self) -> list[str]:
        return list(self.manifest.tensors)

    def tensor(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """The global tensor `name`, or rows [start, stop) of it along dim 0 (any sharding)."""
        rec = self.manifest.tensors.get(name)
        if rec is None:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}")
        lo, hi = (0, rec.global_shape[0] if rec.global_shape else 1) if rows is None else (rows.start, rows.stop)
        parts = []
        for s in rec.shards:
            n = s.shape[0] if s.shape else 1
            a, b = max(lo, s.offset), min(hi, s.offset + n)
            if a >= b:
                continue
            t = self._read(s, name)
            parts.append(t if not t.shape else t[a - s.offset:b - s.offset])
        if not parts:
            raise CheckpointError(f"checkpoint {self.path}: no shard of {name!r} covers rows {lo}:{hi}")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _read(self, s: ShardRecord, name: str) -> torch.Tensor:
        fp = self.path / s.file
        try:
            with safe_open(str(fp), framework="pt") as fh:
                t = fh.get_tensor(s.key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {self.path}: cannot read {name!r} from {s.file} ({e}); "
                                  f"the file is corrupted — use an earlier checkpoint") from None
        if tuple(t.shape) != s.shape or tensor_crc32(t) != s.crc32:
            raise CheckpointError(f"checkpoint {self.path}: tensor {name!r} in {s.file} fails its checksum or "
                                  f"shape check: the file is corrupted — use an earlier checkpoint")
        return t

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: self.tensor(n) for n in self.names() if n.startswith(prefix)}


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def latest_checkpoint(root: str | Path, *, verify: bool = True) -> Path | None:
    """The newest checkpoint under root whose manifest and files check out (corrupt ones skipped)."""
    for p in reversed(list_checkpoints(root)):
        if not verify:
            return p
        try:
            ck = Checkpoint(p)
            for name in ck.names():
                ck.tensor(name)
            return p
        except CheckpointError as e:
            print(f"[checkpoint] skipping {p}: {e}")
    return None
