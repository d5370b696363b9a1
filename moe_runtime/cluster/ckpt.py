"""Checkpoints sharded by owner, built on core/checkpoint.py's format; published to a local
directory (DirStore, no Ray) or through Ray Train to any storage it accepts (RayStore).

Legend: E experts, El = E / EP local experts, W ranks.

Who writes what (one safetensors file per owner, `model-rankNNNNN.safetensors`):
- every rank of the first replica (job ranks 0 .. EP-1) writes its El rows of every expert tensor
  (weights and their AdamW moments) with their row offsets in the global [E, ...] shape;
- job rank 0 also writes the dense part (replicated, so one copy) and the AdamW step counters;
- the other replicas write nothing (they hold copies).
Every rank's shard records (crc32, shapes, row offsets, file sizes) reach rank 0 as msgpack bytes
over one all-gather (never pickle); rank 0 writes the manifest naming which file holds what. A
failed write anywhere is seen by every rank in the same all-gather, so the job stops as one.
With Ray Train each rank reports its own directory and Ray merges them into one checkpoint
directory on the storage; a directory whose manifest names a missing or short file is never
resumed from (read_manifest / newest_remote_checkpoint check every file). Loading slices rows
for the loading rank, so any EP (or a single process) reads any other's checkpoint.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import msgpack
import torch
import torch.distributed as dist
import torch.nn as nn

from moe_runtime.cluster.groups import ParallelGroups
from moe_runtime.core.checkpoint import (FORMAT, MANIFEST, MAX_MANIFEST_BYTES, VERSION, read_sealed, Checkpoint, CheckpointError, FileRecord, Manifest, ShardRecord, latest_checkpoint, merge_records, check_counters, train_counters,
                            prepare_tmp, prune, step_dir_name, tmp_dir_for, write_manifest, write_shard_file)
from moe_runtime.core.modelio import (fetch_checkpoint, filesystem, is_uri, join_uri, load_model_state, load_optimizer_tensors,
                         newest_remote_checkpoint, optimizer_tensors, uri_basename)
from moe_runtime.core.serial import DecodeError, file_digest, unpack_limited

RECORDS_VERSION = 2
MAX_RECORDS_BYTES = 64 * 1024 * 1024


class StorageError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only, permissions): retrying cannot help."""


@dataclass(frozen=True)
class ShardRecordsMessage:
    """One rank's contribution to a checkpoint: its shard records, or the error that stopped it."""

    rank: int
    records: dict[str, ShardRecord]
    global_shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    files: dict[str, FileRecord] = field(default_factory=dict)
    """File name -> size and sha256 of what this rank wrote (the manifest's file records)."""
    error: str = ""
    version: int = RECORDS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "rank": self.rank, "error": self.error, "files": {k: f.to_dict() for k, f in self.files.items()},
                "records": {k: r.to_dict() for k, r in self.records.items()},
                "global_shapes": {k: list(v) for k, v in self.global_shapes.items()}, "dtypes": self.dtypes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardRecordsMessage":
        if d.get("version") != RECORDS_VERSION:
            raise CheckpointError(f"shard records version {d.get('version')} is not {RECORDS_VERSION}")
        return cls(int(d["rank"]), {k: ShardRecord.from_dict(r) for k, r in d["records"].items()},
                   {k: tuple(int(s) for s in v) for k, v in d["global_shapes"].items()},
                   {k: str(v) for k, v in d["dtypes"].items()}, {k: FileRecord.from_dict(v, f"shard records of rank {d['rank']}") for k, v in d["files"].items()},
                   str(d["error"]))

    def encode(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes, what: str = "shard records") -> "ShardRecordsMessage":
        try:
            d = unpack_limited(raw, MAX_RECORDS_BYTES, what)
        except DecodeError as e:
            raise CheckpointError(str(e)) from None
        if not isinstance(d, dict):
            raise CheckpointError("shard records do not hold a map")
        return cls.from_dict(d)


def all_gather_bytes(data: bytes, group) -> list[bytes]:
    """Every rank's bytes, in group-rank order (two all-gathers: lengths, then padded payloads)."""
    n = dist.get_world_size(group)
    if n == 1:
        return [data]
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)  # collective: payload lengths
    top = int(max(s.item() for s in sizes))
    buf = torch.zeros(top, dtype=torch.uint8)
    buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
    bufs = [torch.zeros_like(buf) for _ in range(n)]
    dist.all_gather(bufs, buf, group=group)  # collective: the payloads
    return [bytes(b[:int(s.item())].numpy().tobytes()) for b, s in zip(bufs, sizes)]


class CheckpointStore(Protocol):
    """Where a job's checkpoints live. Every rank of the job calls stage and publish."""

    def stage(self, step: int, groups: ParallelGroups) -> Path: ...
    def publish(self, step: int, staged: Path, groups: ParallelGroups, metrics: dict[str, Any]) -> str: ...
    def newest(self, accept: Callable[[dict[str, Any]], bool] | None = None) -> str | None: ...
    def open(self, location: str) -> Checkpoint: ...


class DirStore:
    """A directory every rank sees (one machine, or a shared file system): ranks write into the
    step's temp dir, rank 0 writes the manifest and renames it into place (core.checkpoint.commit)."""

    def __init__(self, root: str | Path, keep: int | None = None):
        self.root, self.keep = Path(root), keep

    def stage(self, step: int, groups: ParallelGroups) -> Path:
        if groups.layout.rank == 0:
            prepare_tmp(self.root, step)
        dist.barrier(group=groups.world)  # collective: the temp dir exists before anyone writes
        return tmp_dir_for(self.root, step)

    def publish(self, step: int, staged: Path, groups: ParallelGroups, metrics: dict[str, Any]) -> str:
        final = self.root / step_dir_name(step)
        if groups.layout.rank == 0:
            if final.exists():  # re-saving a step (e.g. after recovery) replaces the old copy
                shutil.rmtree(final)
            os.rename(staged, final)
            if self.keep is not None:
                prune(self.root, self.keep)
        dist.barrier(group=groups.world)  # collective: the checkpoint is in place for every rank
        return str(final)

    def newest(self, accept: Callable[[dict[str, Any]], bool] | None = None) -> str | None:
        last = latest_checkpoint(self.root, check=_accepting(accept))
        return None if last is None else str(last)

    def open(self, location: str) -> Checkpoint:
        return Checkpoint(location)


class RayStore:
    """Ray Train's storage (`RunConfig(storage_path, name)`): a local path or a URI. Each rank
    stages its files in a local temp dir and reports it; Ray merges them into <run>/step_N."""

    def __init__(self, run_uri: str, local_tmp: str | None = None, keep: int | None = None):
        self.run_uri, self.keep = run_uri.rstrip("/"), keep
        self.tmp = Path(tempfile.mkdtemp(prefix="moe-ckpt-", dir=local_tmp))
        weakref.finalize(self, shutil.rmtree, self.tmp, True)  # staged and downloaded files go with the store

    def stage(self, step: int, groups: ParallelGroups) -> Path:
        d = self.tmp / f"stage-{step_dir_name(step)}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def publish(self, step: int, staged: Path, groups: ParallelGroups, metrics: dict[str, Any]) -> str:
        import ray.train
        try:
            # collective (Ray Train): every rank reports; Ray uploads each directory into one checkpoint.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staged)),
                             checkpoint_dir_name=step_dir_name(step))
        except OSError as e:
            raise StorageError(f"cannot write checkpoint {self.run_uri}/{step_dir_name(step)}: {e}") from None
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        if self.keep and groups.layout.rank == 0:  # after report: every rank's files of this step are stored
            prune_run(self.run_uri, self.keep)
        return join_uri(self.run_uri, step_dir_name(step))

    def newest(self, accept: Callable[[dict[str, Any]], bool] | None = None) -> str | None:
        """The newest valid checkpoint of the run; with `accept`, the newest whose manifest's
        train_state it accepts (older ones are tried in turn)."""
        if not is_uri(self.run_uri):
            last = latest_checkpoint(self.run_uri, check=_accepting(accept))
            return None if last is None else str(last)
        fs, root = filesystem(self.run_uri)
        steps = None
        while True:  # newest valid first; one refused by `accept` is hidden and the next tried
            path = newest_remote_checkpoint(_Hiding(fs, steps), root)
            if path is None:
                return None
            state = _remote_train_state(fs, path)
            try:
                check_counters(state, f"{join_uri(self.run_uri, path.rsplit('/', 1)[-1])}/{MANIFEST}")
                usable = accept is None or accept(state)
            except CheckpointError as e:
                print(f"[cluster] skipping checkpoint: {e}", flush=True)
                usable = False
            if usable:
                return join_uri(self.run_uri, path.rsplit("/", 1)[-1])
            steps = (steps or set()) | {path}

    def open(self, location: str) -> Checkpoint:
        if not is_uri(location):
            return Checkpoint(location)
        dest = self.tmp / ("read-" + uri_basename(location))
        shutil.rmtree(dest, ignore_errors=True)
        # Every file comes down to local disk (the checkpoint's integrity check covers all of them);
        # only this rank's tensors are then read into memory.
        fetch_checkpoint(location, dest)
        return Checkpoint(dest)


def _accepting(accept: Callable[[dict[str, Any]], bool] | None) -> Callable[[Checkpoint], None]:
    """A checkpoint a resume can use: its train_state holds the counters (else CheckpointError naming
    the field, and the previous checkpoint is tried) and `accept` takes it."""

    def check(ck: Checkpoint) -> None:
        train_counters(ck)
        if accept is not None and not accept(ck.manifest.train_state):
            raise CheckpointError("written by another invocation of this run (--no-resume ignores it)")
    return check


def _remote_train_state(fs, path: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as fin, open(Path(d) / MANIFEST, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        mf = Path(d) / MANIFEST
        return Manifest.from_dict(read_sealed(mf, FORMAT, VERSION, MAX_MANIFEST_BYTES), str(mf)).train_state


class _Hiding:
    """A pyarrow filesystem view whose directory listings leave out `hidden` paths."""

    def __init__(self, fs, hidden: set[str] | None):
        self.fs, self.hidden = fs, hidden or set()

    def get_file_info(self, sel):
        infos = self.fs.get_file_info(sel)
        return [i for i in infos if i.path not in self.hidden] if isinstance(infos, list) else infos

    def __getattr__(self, name: str):
        return getattr(self.fs, name)


def owned_tensors(model: nn.Module, opt: torch.optim.Optimizer, expert_names: set[str], groups: ParallelGroups
                  ) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, tuple[int, ...]]]:
    """(tensors, row offsets, global shapes) that this rank writes; empty if it writes nothing."""
    lay = groups.layout
    if not lay.writes_experts:
        return {}, {}, {}
    tensors, offsets, shapes = {}, {}, {}
    items = [(f"model/{k}", k, v) for k, v in model.state_dict().items()]
    items += [(key, key.split("/")[1], v) for key, v in optimizer_tensors(model, opt).items()]
    for key, pname, t in items:
        sliced = pname in expert_names and t.ndim > 0 and not key.endswith("/step")
        if sliced:
            tensors[key], offsets[key] = t, lay.expert_rows.start
            shapes[key] = (lay.num_experts,) + tuple(t.shape[1:])
        elif lay.rank == 0:
            tensors[key], shapes[key] = t, tuple(t.shape)
    return tensors, offsets, shapes


def _write_own(staged: Path, model, opt, expert_names, groups, before_write: Callable[[], None] | None
               ) -> ShardRecordsMessage:
    lay = groups.layout
    tensors, offsets, shapes = owned_tensors(model, opt, expert_names, groups)
    if not tensors:
        return ShardRecordsMessage(lay.rank, {}, {}, {})
    file = f"model-rank{lay.rank:05d}.safetensors"
    try:
        if before_write is not None:
            before_write()
        recs = write_shard_file(staged, file, tensors, offsets)
        written = FileRecord((staged / file).stat().st_size, file_digest(staged / file))
    except OSError as e:
        return ShardRecordsMessage(lay.rank, {}, {}, {}, error=f"rank {lay.rank} cannot write {staged / file}: {e}")
    return ShardRecordsMessage(lay.rank, recs, shapes, {k: str(t.dtype).removeprefix("torch.")
                                                         for k, t in tensors.items()}, {file: written})


def save_sharded(store: CheckpointStore, step: int, model: nn.Module, opt: torch.optim.Optimizer,
                 expert_names: set[str], groups: ParallelGroups, config: dict[str, Any], train_state: dict[str, Any],
                 metrics: dict[str, Any] | None = None, before_manifest: Callable[[], None] | None = None,
                 before_write: Callable[[], None] | None = None) -> str:
    """Every rank of the job calls this; returns where the checkpoint was published."""
    lay = groups.layout
    staged = store.stage(step, groups)
    msg = _write_own(staged, model, opt, expert_names, groups, before_write)
    if before_manifest is not None:
        before_manifest()
    msgs = [ShardRecordsMessage.decode(b) for b in all_gather_bytes(msg.encode(), groups.world)]
    errors = [m.error for m in msgs if m.error]
    if errors:  # every rank saw the same messages: the whole job stops here, none retries
        raise StorageError(errors[0])
    if lay.rank == 0:
        records = merge_records([m.records for m in msgs], {k: v for m in msgs for k, v in m.global_shapes.items()},
                                {k: v for m in msgs for k, v in m.dtypes.items()})
        files = {f: s for m in msgs for f, s in m.files.items()}
        try:
            write_manifest(staged, Manifest(step=step, config=config, train_state=train_state, tensors=records,
                                            files=files, layout={"world": lay.world, "ep": lay.ep}))
        except OSError as e:
            raise StorageError(f"cannot write {staged}/manifest.msgpack: {e}") from None
    return store.publish(step, staged, groups, metrics or {"step": step})


def load_sharded(ck: Checkpoint, model: nn.Module, opt: torch.optim.Optimizer, expert_names: set[str],
                 groups: ParallelGroups) -> None:
    """Load this rank's rows of the expert tensors and all dense tensors, whatever wrote them."""
    rows = groups.layout.expert_rows
    load_model_state(model, ck, rows_for=lambda k: rows if k in expert_names else None)

    def get(key: str, p: nn.Parameter) -> torch.Tensor | None:
        if key not in ck.manifest.tensors:
            return None
        sliced = key.split("/")[1] in expert_names and not key.endswith("/step")
        return ck.tensor(key, rows if sliced else None)
    load_optimizer_tensors(model, opt, get)


# ---------------------------------------------------------------------- the run directory as a whole
RUN_ENTRIES_OF_AN_INVOCATION = ("metrics.jsonl", "checkpoint_manager_snapshot.json")
"""Besides the step_* directories: what `--no-resume` moves aside with them (Ray Train's own snapshot
of its checkpoint list included, so the new run neither resumes nor prunes from the old list)."""


def _step_entries(run_uri: str) -> list[str]:
    """Names of the step_* directories (published or not) directly under the run directory."""
    if not is_uri(run_uri):
        root = Path(run_uri)
        return sorted(p.name for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []
    import pyarrow.fs as pafs
    fs, root = filesystem(run_uri)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("step_"))


def prune_run(run_uri: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` step_* directories of the run directory, whoever wrote them
    (an earlier invocation, an attempt Ray Train's checkpoint list does not know); returns the names
    deleted. Ray Train's own num_to_keep sees only the checkpoints of the current invocation."""
    if keep <= 0:
        return []
    old = _step_entries(run_uri)[:-keep]
    for name in old:
        if not is_uri(run_uri):
            shutil.rmtree(Path(run_uri) / name, ignore_errors=True)
        else:
            fs, root = filesystem(run_uri)
            fs.delete_dir(f"{root}/{name}")
    return old


def set_aside_run(run_uri: str) -> tuple[str, list[str]] | None:
    """`--no-resume`: move the previous invocation's checkpoints and metrics into
    <run>/previous-<UTC time>/ (kept, never pruned by the new run); (where, names) or None."""
    names = _step_entries(run_uri) + list(RUN_ENTRIES_OF_AN_INVOCATION)
    if not is_uri(run_uri):
        from moe_runtime.core.checkpoint import set_aside
        moved = set_aside(run_uri, names)
        return None if moved is None else (str(moved[0]), moved[1])
    import time

    import pyarrow.fs as pafs
    fs, root = filesystem(run_uri)
    present = [n for n in names if fs.get_file_info(f"{root}/{n}").type != pafs.FileType.NotFound]
    if not present:
        return None
    dest = f"previous-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    for name in present:  # object stores have no rename: copy every file, then delete the original
        src = f"{root}/{name}"
        if fs.get_file_info(src).type == pafs.FileType.Directory:
            for info in fs.get_file_info(pafs.FileSelector(src, recursive=True)):
                if info.type == pafs.FileType.File:
                    fs.copy_file(info.path, f"{root}/{dest}/{name}/{info.path[len(src) + 1:]}")
            fs.delete_dir(src)
        else:
            fs.copy_file(src, f"{root}/{dest}/{name}")
            fs.delete_file(src)
    return join_uri(run_uri, dest), present
