"""Checkpoints: safetensors shards + a sealed msgpack manifest, written atomically, reshardable.

Layout of one checkpoint (one directory per step):

    <root>/step_00000200/
        model-rank00000.safetensors     tensors owned by rank 0 (dense part, its experts)
        model-rank00001.safetensors     ... one file per owner
        manifest.msgpack                written LAST, then the directory is renamed into place

Every tensor is described in the manifest by its global shape, dtype and a list of shards (file,
key, offset along dim 0, shape, crc32). A tensor split over expert-parallel ranks is stored as row
slices of its global [E, ...] shape, so a checkpoint written with EP=a loads with EP=b: the
reader assembles or slices rows as asked. Writing goes to `.tmp-step_NNNNNNNN`, and only a
complete directory with a manifest is ever renamed to `step_NNNNNNNN`, so a crash at any point
leaves the previous checkpoint as the newest valid one.

Integrity (the rule of core/serial.py, for every file we write): the manifest is sealed (sha256
over its whole content) and lists every shard file's size and sha256. Nothing is used before it
is checked: the manifest's digest and structure when the checkpoint is opened; a shard file's
digest, and every tensor's dtype / shape / byte length in its safetensors header against the
manifest, before the first tensor is read from that file. File names are plain names inside the
checkpoint directory (no paths). Any failure is a CheckpointError naming the file; `latest_checkpoint`
skips such a checkpoint with the reason and falls back to the previous one.
Version 1 checkpoints (no digests) are refused with a message saying so: accepting them would
keep exactly the silent wrong loads this version exists to stop.
"""
from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from moe_runtime.core.manifest import (FORMAT, MANIFEST, ST_DTYPES, VERSION, CheckpointError, FileRecord, Manifest,  # noqa: F401
                          ShardRecord, TensorRecord, check_file_name, field_of, tensor_crc32)
# (field_of, FORMAT, ... are re-exported: cluster shard-records files are checked with the same accessors)
from moe_runtime.core.serial import DecodeError, file_digest, seal, unseal

MAX_MANIFEST_BYTES = 32 * 1024 * 1024
"""~300k shard records; with the default object budget its worst case decodes into < 4x + 200 MB."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".tmp-{step_dir_name(step)}"


def write_shard_file(tmp_dir: Path, file: str, tensors: dict[str, torch.Tensor],
                     offsets: dict[str, int] | None = None) -> dict[str, ShardRecord]:
    """Write one owner's tensors to tmp_dir/file (fsynced); return a shard record per tensor name.

    offsets[name] is the first global row of a row-sliced tensor (0 / absent: not sliced).
    """
    check_file_name(file, str(tmp_dir))
    offsets = offsets or {}
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    keys = {name: name.replace("/", ".") for name in cpu}
    try:
        save_file({keys[n]: t for n, t in cpu.items()}, str(tmp_dir / file))
        _fsync_file(tmp_dir / file)
    except (SafetensorError, OSError) as e:  # name the path: disk full / read-only must say where
        raise OSError(getattr(e, "errno", None) or errno.EIO, f"cannot write checkpoint shard ({e})",
                      str(tmp_dir / file)) from None
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
        out[name] = TensorRecord(tuple(global_shapes[name]), dtypes[name], tuple(recs))
        out[name].check_tiling(f"tensor {name!r}")
    return out


def write_sealed(path: Path, body: Any, fmt: str, version: int) -> None:
    """Write a sealed msgpack file (see core/serial.py) and fsync it; for manifests and records files."""
    data = seal(body, fmt, version)
    try:
        with open(path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        raise OSError(e.errno, f"cannot write ({e.strerror})", str(path)) from None


def read_sealed(path: Path, fmt: str, version: int, max_bytes: int) -> Any:
    """The body of a sealed file after size, format, version and digest check out (CheckpointError)."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CheckpointError(f"{path} is {size} bytes, over the {max_bytes}-byte limit")
        return unseal(path.read_bytes(), fmt, version, str(path), max_bytes)
    except DecodeError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror})") from None


def commit(root: Path, manifest: Manifest, keep: int | None = None) -> Path:
    """Seal the manifest (with every shard file's size and sha256) into the step's temp dir, fsync,
    and rename the directory into place (atomic)."""
    tmp, final = tmp_dir_for(root, manifest.step), root / step_dir_name(manifest.step)
    names = sorted({s.file for t in manifest.tensors.values() for s in t.shards})
    files = {f: FileRecord((tmp / f).stat().st_size, file_digest(tmp / f)) for f in names}
    manifest = dataclasses.replace(manifest, files=files)
    write_sealed(tmp / MANIFEST, manifest.to_dict(), FORMAT, VERSION)
    if final.exists():  # re-saving a step (e.g. after recovery) replaces the old copy
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    if keep is not None:
        prune(root, keep)
    return final


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Seal a manifest whose `files` records the caller already has (shards written and digested by
    other processes, e.g. the ranks of a Ray Train job whose directories are merged on upload)."""
    write_sealed(Path(directory) / MANIFEST, manifest.to_dict(), FORMAT, VERSION)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
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


def set_aside(run_dir: str | Path, names: list[str]) -> tuple[Path, list[str]] | None:
    """`--no-resume`: move the previous invocation's entries of run_dir (checkpoint directories,
    metrics.jsonl, ...) into run_dir/previous-<UTC time>/ instead of letting the new run prune
    them; returns (where, what moved), or None when there was nothing to move."""
    run_dir = Path(run_dir)
    present = [n for n in names if (run_dir / n).exists()]
    if not present:
        return None
    dest = run_dir / f"previous-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    dest.mkdir(parents=True)
    for name in present:
        os.rename(run_dir / name, dest / name)
    return dest, present


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
    """The checkpoint's manifest: digest, structure and shard file sizes checked (CheckpointError)."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {path} has no {MANIFEST}: it was not completely written")
    manifest = Manifest.from_dict(read_sealed(mf, FORMAT, VERSION, MAX_MANIFEST_BYTES), str(mf))
    if re.fullmatch(r"step_\d{8}", path.name) and path.name != step_dir_name(manifest.step):
        raise CheckpointError(f"{mf} says step {manifest.step}, but the directory is {path.name}")
    for f, rec in manifest.files.items():
        fp = path / f
        if not fp.is_file():
            raise CheckpointError(f"checkpoint {path}: shard file {f} is missing")
        if fp.stat().st_size != rec.size:
            raise CheckpointError(f"checkpoint {path}: shard file {f} is {fp.stat().st_size} bytes, the manifest "
                                  f"says {rec.size}: it is truncated or was overwritten")
    return manifest


class Checkpoint:
    """A checkpoint directory whose manifest checked out. Each shard file's digest and safetensors
    header are verified before the first tensor is read from it (see module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self._verified: set[str] = set()

    @property
    def step(self) -> int:
        return self.manifest.step

    def names(self) -> list[str]:
        return list(self.manifest.tensors)

    def verify(self) -> "Checkpoint":
        """Check every shard file (digest, header) and read every tensor once; CheckpointError if any fails."""
        for f in self.manifest.files:
            self._verify_file(f)
        for name in self.names():
            self.tensor(name)
        return self

    def _verify_file(self, file: str) -> None:
        if file in self._verified:
            return
        fp, rec = self.path / file, self.manifest.files[file]
        try:
            digest = file_digest(fp)
        except OSError as e:
            raise CheckpointError(f"checkpoint {self.path}: cannot read {file} ({e.strerror})") from None
        if digest != rec.sha256:
            raise CheckpointError(f"checkpoint {self.path}: shard file {file} fails its sha256 digest: the file "
                                  f"is corrupted — use an earlier checkpoint")
        want = {s.key: (name, t, s) for name, t in self.manifest.tensors.items() for s in t.shards if s.file == file}
        try:
            with safe_open(str(fp), framework="pt") as fh:
                header = {k: (fh.get_slice(k).get_dtype(), tuple(fh.get_slice(k).get_shape())) for k in fh.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {self.path}: {file} is not a readable safetensors file ({e})") from None
        if set(header) != set(want):
            extra, missing = sorted(set(header) - set(want)), sorted(set(want) - set(header))
            raise CheckpointError(f"checkpoint {self.path}: {file} holds keys that differ from the manifest "
                                  f"(extra {extra[:3]}, missing {missing[:3]})")
        for key, (name, t, s) in want.items():
            code, shape = header[key]
            if code != ST_DTYPES[t.dtype] or shape != s.shape:
                raise CheckpointError(f"checkpoint {self.path}: {file} stores {name!r} as {code} {list(shape)}, the "
                                      f"manifest says {ST_DTYPES[t.dtype]} {list(s.shape)}")
        nbytes = sum(math.prod(s.shape) * t.itemsize for _, t, s in want.values())
        if nbytes > rec.size:
            raise CheckpointError(f"checkpoint {self.path}: {file} is {rec.size} bytes, smaller than the "
                                  f"{nbytes} bytes its tensors need")
        self._verified.add(file)

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
            t = self._read(s, name, rec.dtype)
            parts.append(t if not t.shape else t[a - s.offset:b - s.offset])
        if not parts:
            if rec.global_shape and rec.global_shape[0] == 0:
                return torch.empty(rec.global_shape, dtype=getattr(torch, rec.dtype))
            raise CheckpointError(f"checkpoint {self.path}: no shard of {name!r} covers rows {lo}:{hi}")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def _read(self, s: ShardRecord, name: str, dtype: str) -> torch.Tensor:
        self._verify_file(s.file)
        try:
            with safe_open(str(self.path / s.file), framework="pt") as fh:
                t = fh.get_tensor(s.key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {self.path}: cannot read {name!r} from {s.file} ({e}); "
                                  f"the file is corrupted — use an earlier checkpoint") from None
        if tuple(t.shape) != s.shape or t.dtype != getattr(torch, dtype) or tensor_crc32(t) != s.crc32:
            raise CheckpointError(f"checkpoint {self.path}: tensor {name!r} in {s.file} fails its checksum, dtype "
                                  f"or shape check: the file is corrupted — use an earlier checkpoint")
        return t

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {n[len(prefix):]: self.tensor(n) for n in self.names() if n.startswith(prefix)}


def check_optimizer_coverage(ck: Checkpoint, param_names: list[str],
                             keys: tuple[str, ...] = ("exp_avg", "exp_avg_sq", "step")) -> None:
    """Refuse a checkpoint whose optimizer state (optim/<param>/<key>) misses any parameter or key."""
    missing = [f"optim/{p}/{k}" for p in param_names for k in keys if f"optim/{p}/{k}" not in ck.manifest.tensors]
    if missing:
        raise CheckpointError(f"checkpoint {ck.path}: optimizer state does not cover every parameter (missing "
                              f"{len(missing)} tensor(s), e.g. {missing[:3]}); resuming from it would restart "
                              f"their moments from zero — use an earlier checkpoint")


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def latest_checkpoint(root: str | Path, *, verify: bool = True,
                      check: Callable[[Checkpoint], None] | None = None) -> Path | None:
    """The newest checkpoint under root that passes every check (and `check`, e.g. optimizer
    coverage); a failing one is skipped with the reason printed, and the previous one is tried."""
    for p in reversed(list_checkpoints(root)):
        if not verify:
            return p
        try:
            ck = Checkpoint(p).verify()
            if check is not None:
                check(ck)
            return p
        except CheckpointError as e:
            print(f"[checkpoint] skipping {p}: {e}", flush=True)
    return None


RESUME_COUNTERS = ("step", "tokens_seen")
"""train_state entries a resume restores (every trainer writes both)."""


def train_counters(ck: Checkpoint) -> dict[str, int]:
    """The counters a resume restores from the manifest's train_state: each a non-negative int, else a
    CheckpointError naming the manifest and the field (`resume_check` turns that into a skip, so the
    previous checkpoint is used)."""
    return check_counters(ck.manifest.train_state, ck.path / MANIFEST)


def check_counters(state: dict[str, Any], what: Any) -> dict[str, int]:
    """`train_counters` on a manifest's train_state read elsewhere (a remote store); `what` names it."""
    for key in RESUME_COUNTERS:
        v = state.get(key)
        if key not in state or not isinstance(v, int) or isinstance(v, bool) or v < 0:
            found = "is missing" if key not in state else f"is {type(v).__name__} {str(v)[:40]!r}"
            raise CheckpointError(f"{what}: train_state.{key} {found}, expected a non-negative int; a resume "
                                  f"needs it to continue the step count — use an earlier checkpoint")
    return {key: state[key] for key in RESUME_COUNTERS}


class ResumeMismatch(ValueError):
    """The run directory's checkpoints belong to another run (model config) or are past max_steps.
    Not a corruption: resume stops with this error instead of falling back to an older checkpoint."""


def resume_check(run_config: dict[str, Any], param_names: list[str]) -> Callable[[Checkpoint], None]:
    """The check `Trainer.fit` passes to `latest_checkpoint`: optimizer state covers every parameter and
    train_state holds the counters (else the checkpoint is skipped), and the checkpoint's model config and step fit this run (else
    ResumeMismatch, naming the flags that start over)."""
    from moe_runtime.core.config import RunConfig

    def check(ck: Checkpoint) -> None:
        check_optimizer_coverage(ck, param_names)
        train_counters(ck)
        ours = RunConfig.from_dict(run_config, source="this run")
        try:
            theirs = RunConfig.from_dict(ck.manifest.config, source=str(ck.path / MANIFEST))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        fix = "pass --no-resume to start over in this directory, or a new --out"
        if theirs.model != ours.model:
            diff = sorted(k for k in ours.to_dict()["model"] if ours.to_dict()["model"][k] != theirs.to_dict()["model"][k])
            raise ResumeMismatch(f"checkpoint {ck.path} was written for another model ({theirs.name!r}; differs in "
                                 f"{diff}); {fix}")
        if ck.step > ours.train.max_steps:
            raise ResumeMismatch(f"checkpoint {ck.path} is at step {ck.step}, past max_steps={ours.train.max_steps}; "
                                 f"pass --max-steps {ck.step} or more to continue it, or {fix}")
    return check
