import os

import msgpack
import pytest
import torch

from moe_runtime.core.checkpoint import (Checkpoint, CheckpointError, latest_checkpoint, merge_records, prepare_tmp,
                            save_checkpoint, write_shard_file)


def _tensors():
    torch.manual_seed(0)
    return {"a": torch.randn(4, 3), "b/c": torch.arange(6, dtype=torch.int64), "bf": torch.randn(2, 2).bfloat16(),
            "scalar": torch.tensor(3.0)}


def test_round_trip_and_prune(tmp_path):
    t = _tensors()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, t, {"cfg": 1}, {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    ck = Checkpoint(latest_checkpoint(tmp_path))
    assert ck.step == 3 and ck.manifest.train_state == {"step": 3}
    for k, v in t.items():
        assert torch.equal(ck.tensor(k), v) and ck.tensor(k).dtype == v.dtype


def test_row_sharded_tensor_reassembles_and_reslices(tmp_path):
    full = torch.arange(24.0).view(6, 4)
    tmp = prepare_tmp(tmp_path, 5)
    recs = [write_shard_file(tmp, f"r{r}.safetensors", {"w": full[r * 2:(r + 1) * 2]}, {"w": r * 2}) for r in range(3)]
    records = merge_records(recs, {"w": (6, 4)}, {"w": "float32"})
    from moe_runtime.core.checkpoint import Manifest, commit
    commit(tmp_path, Manifest(step=5, config={}, train_state={}, tensors=records, files={}))
    ck = Checkpoint(tmp_path / "step_00000005")
    assert torch.equal(ck.tensor("w"), full)
    assert torch.equal(ck.tensor("w", slice(1, 5)), full[1:5])  # any other sharding


def test_truncated_file_refused_previous_stays_loadable(tmp_path):
    t = _tensors()
    save_checkpoint(tmp_path, 1, t, {}, {"step": 1})
    p2 = save_checkpoint(tmp_path, 2, t, {}, {"step": 2})
    f = p2 / "model-rank00000.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(p2)
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_corrupted_bytes_fail_checksum(tmp_path):
    t = _tensors()
    save_checkpoint(tmp_path, 1, t, {}, {"step": 1})
    p2 = save_checkpoint(tmp_path, 2, t, {}, {"step": 2})
    f = p2 / "model-rank00000.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-5] ^= 0xFF  # flip bits inside the last tensor's data, size unchanged
    f.write_bytes(bytes(raw))
    ck = Checkpoint(p2)
    with pytest.raises(CheckpointError, match="fails its sha256 digest"):
        for n in ck.names():
            ck.tensor(n)
    assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_bad_manifests(tmp_path):
    p = save_checkpoint(tmp_path, 1, _tensors(), {}, {"step": 1})
    mf = p / "manifest.msgpack"
    good = mf.read_bytes()
    mf.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(p)
    d = msgpack.unpackb(good, raw=False)
    d["version"] = 99
    mf.write_bytes(msgpack.packb(d))
    with pytest.raises(CheckpointError, match="version 99; this build reads version 2"):
        Checkpoint(p)
    os.remove(mf)
    with pytest.raises(CheckpointError, match="was not completely written"):
        Checkpoint(p)


def test_crash_before_manifest_leaves_previous_latest(tmp_path):
    save_checkpoint(tmp_path, 1, _tensors(), {}, {"step": 1})
    tmp = prepare_tmp(tmp_path, 2)
    write_shard_file(tmp, "model-rank00000.safetensors", _tensors())  # crash here: no manifest, no rename
    assert latest_checkpoint(tmp_path).name == "step_00000001"
