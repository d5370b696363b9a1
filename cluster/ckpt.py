"""Checkpoints sharded by owner, built on moe/checkpoint.py's primitives.

Legend: E experts, El = E / EP local experts, W ranks.

Who writes what (one safetensors file per owner, `model-rankNNNNN.safetensors`):
- every rank of the first replica (job ranks 0 .. EP-1) writes its El rows of every expert tensor
  (weights and their AdamW moments) with their row offsets in the global [E, ...] shape;
- job rank 0 also writes the dense part (replicated, so one copy) and the AdamW step counters;
- the other replicas write nothing (they hold copies).
Shard records travel to rank 0 without pickle: each writer leaves a small msgpack record file in the
step's temp dir; after a barrier rank 0 reads them, merges them, deletes them and commits (manifest
last, then the atomic rename). A crash anywhere before the rename leaves the previous checkpoint as
the newest valid one. Loading slices rows for the loading rank, so any EP (or a single process)
reads any other's checkpoint.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgpack
import torch
import torch.distributed as dist
import torch.nn as nn

from cluster.groups import ParallelGroups
from moe.checkpoint import (Checkpoint, CheckpointError, Manifest, ShardRecord, commit, merge_records,
                            prepare_tmp, tmp_dir_for, write_shard_file)
from moe.serial import DecodeError, unpack_limited
from moe.train import load_model_state, load_optimizer_tensors, optimizer_tensors

RECORDS_VERSION = 1
MAX_RECORDS_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ShardRecordsMessage:
    """One writer's shard records, handed to the committing rank as a msgpack file."""

    rank: int
    records: dict[str, ShardRecord]
    global_shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    version: int = RECORDS_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "rank": self.rank,
                "records": {k: r.to_dict() for k, r in self.records.items()},
                "global_shapes": {k: list(v) for k, v in self.global_shapes.items()}, "dtypes": self.dtypes}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShardRecordsMessage":
        if d.get("version") != RECORDS_VERSION:
            raise CheckpointError(f"shard records version {d.get('version')} is not {RECORDS_VERSION}")
        return cls(int(d["rank"]), {k: ShardRecord.from_dict(r) for k, r in d["records"].items()},
                   {k: tuple(int(s) for s in v) for k, v in d["global_shapes"].items()},
                   {k: str(v) for k, v in d["dtypes"].items()})

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


def records_file(rank: int) -> str:
    return f"records-rank{rank:05d}.msgpack"


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


def save_sharded(root: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, expert_names: set[str],
                 groups: ParallelGroups, config: dict[str, Any], train_state: dict[str, Any], keep: int,
                 before_manifest: Callable[[], None] | None = None) -> Path:
    """Every rank of the job calls this; returns the committed checkpoint directory."""
    lay, tmp = groups.layout, tmp_dir_for(root, step)
    if lay.rank == 0:
        prepare_tmp(root, step)
    dist.barrier(group=groups.world)  # collective: the temp dir exists before anyone writes
    tensors, offsets, shapes = owned_tensors(model, opt, expert_names, groups)
    if tensors:
        recs = write_shard_file(tmp, f"model-rank{lay.rank:05d}.safetensors", tensors, offsets)
        msg = ShardRecordsMessage(lay.rank, recs, shapes,
                                  {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()})
        _write_synced(tmp / records_file(lay.rank), msg.encode())
    if before_manifest is not None:
        before_manifest()
    dist.barrier(group=groups.world)  # collective: every shard and record file is on disk
    final = root / f"step_{step:08d}"
    if lay.rank == 0:
        msgs = [ShardRecordsMessage.decode((tmp / records_file(r)).read_bytes(), records_file(r)) for r in range(lay.ep)]
        shapes = {k: v for m in msgs for k, v in m.global_shapes.items()}
        dtypes = {k: v for m in msgs for k, v in m.dtypes.items()}
        records = merge_records([m.records for m in msgs], shapes, dtypes)
        for r in range(lay.ep):
            (tmp / records_file(r)).unlink()
        final = commit(root, Manifest(step=step, config=config, train_state=train_state, tensors=records, files={},
                                      layout={"world": lay.world, "ep": lay.ep}), keep)
    dist.barrier(group=groups.world)  # collective: the checkpoint is committed for every rank
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


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
