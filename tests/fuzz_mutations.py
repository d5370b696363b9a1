"""The mutations of the fuzz tier: byte-level (any file), msgpack bombs, and structural edits of
checkpoints and traces written back with a VALID digest (what a buggy writer or an editing tool
would produce), so that only the structural checks behind the digest can catch them."""
from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np

from moe_runtime.core.checkpoint import MANIFEST, read_sealed, write_sealed
from moe_runtime.core.manifest import FORMAT, VERSION
from moe_runtime.core.serial import file_digest, seal, seal_packed
from moe_runtime.offload.trace import TRACE_FORMAT
from tests.fuzz_oracle import _OTHER_VALUES, _int, oracle_valid

SHARD = "model-rank00000.safetensors"


# ---------------------------------------------------------------- byte-level mutations (any file)
def bit_flip(raw: bytes, rng: random.Random) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.choice((1, 1, 2, 3))):
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def truncation(raw: bytes, rng: random.Random) -> bytes:
    return raw[:rng.randrange(len(raw))]


def random_bytes(raw: bytes, rng: random.Random) -> bytes:
    if rng.random() < 0.2:
        return rng.randbytes(rng.randrange(1, 4096))
    b = bytearray(raw)
    at, k = rng.randrange(len(b)), rng.randrange(1, 64)
    b[at:at + k] = rng.randbytes(min(k, len(b) - at))
    return bytes(b)


def trailing_data(raw: bytes, rng: random.Random) -> bytes:
    tails = [rng.randbytes(rng.randrange(1, 64)), b"\x00", b"\x92\x01", b"\xc4\x10abc", msgpack.packb({"x": 1})]
    return raw + rng.choice(tails)


def msgpack_bomb(rng: random.Random, max_mb: float) -> bytes:
    """Nested / flat empty containers, many small ints or strings: tiny on disk, huge as Python objects."""
    n = int(rng.uniform(0.05, 1.0) * max_mb * 2**20)
    kind = rng.choice(("flat_arrays", "flat_maps", "deep", "ints", "strs"))
    if kind == "flat_arrays":
        return b"\xdd" + struct.pack(">I", n) + b"\x90" * n
    if kind == "flat_maps":
        return b"\xdf" + struct.pack(">I", n // 2) + b"\xa0\x80" * (n // 2)
    if kind == "deep":
        return b"\x91" * n + b"\x90"
    if kind == "ints":
        return b"\xdd" + struct.pack(">I", n // 3) + b"\xcd\x12\x34" * (n // 3)
    return b"\xdd" + struct.pack(">I", n // 2) + b"\xa1x" * (n // 2)


def bomb_file(rng: random.Random, max_mb: float, fmt: str, version: int) -> bytes:
    """A bomb as the whole file, or sealed with a valid digest (the body must then stop it)."""
    bomb = msgpack_bomb(rng, max_mb)
    if rng.random() < 0.5:
        return bomb
    return seal_packed(bomb, fmt, version)


# ---------------------------------------------------------------- structural mutations (resealed)


def swap_value(d: Any, rng: random.Random, allowed: Callable[[list[str], Any], bool]) -> str:
    """Replace one value somewhere in d by a value `allowed(path, value)` calls invalid; return the path."""
    paths = []

    def walk(x: Any, path: list[str]) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                paths.append((x, k, path + [str(k)]))
                walk(v, path + [str(k)])
        elif isinstance(x, list):
            for i, v in enumerate(x):
                paths.append((x, i, path + [str(i)]))
                walk(v, path + [str(i)])
    walk(d, [])
    rng.shuffle(paths)
    for parent, key, path in paths:
        for v in rng.sample(_OTHER_VALUES, len(_OTHER_VALUES)):
            if type(v) is not type(parent[key]) and not allowed(path, v):
                parent[key] = v
                return "/".join(path)
    raise AssertionError("no swappable value")


def reseal_manifest(step_dir: Path, body: dict[str, Any], redigest: bool = True) -> None:
    """Write body as the manifest with a valid digest (as a buggy writer or an editing tool would)."""
    if redigest:
        for f, rec in body.get("files", {}).items() if isinstance(body.get("files"), dict) else []:
            p = step_dir / f
            if isinstance(rec, dict) and p.is_file() and not p.is_symlink():
                rec.update(size=p.stat().st_size, sha256=file_digest(p))
    write_sealed(step_dir / MANIFEST, body, FORMAT, VERSION)


def manifest_body(step_dir: Path) -> dict[str, Any]:
    return read_sealed(step_dir / MANIFEST, FORMAT, VERSION, 1 << 26)


def _free_form(path: list[str], v: Any) -> bool:
    """Manifest values any type of which is legitimate: layout, train_state entries a resume does not read."""
    return path[0] == "layout" or (path[0] == "train_state" and path[1:2] not in (["step"], ["tokens_seen"]))


def structural_checkpoint(step_dir: Path, rng: random.Random) -> str:
    body = manifest_body(step_dir)
    names = sorted(body["tensors"])
    op = rng.choice(("swap", "tensors_list", "files_list", "model_list", "delete", "unknown", "optim_rename",
                     "offset", "global_shape", "dtype", "crc", "size", "format"))
    if op == "swap":
        where = swap_value(body, rng, lambda p, v: _free_form(p, v) or _config_ok(body, p, v))
        reseal_manifest(step_dir, body)
        return "swap " + where
    if op == "tensors_list":
        body["tensors"] = list(body["tensors"].values())
    elif op == "files_list":
        body["files"] = list(body["files"])
    elif op == "model_list":
        body["config"]["model"] = list(body["config"]["model"].items())
    elif op == "delete":
        del body[rng.choice(["step", "config", "train_state", "files", "tensors"])]
    elif op == "unknown":
        body[rng.choice(["extra", "Tensors"])] = {}
    elif op == "optim_rename":
        k = rng.choice([n for n in names if n.startswith("optim/")])
        body["tensors"]["oPtim" + k[5:]] = body["tensors"].pop(k)
    elif op in ("offset", "global_shape", "dtype", "crc"):
        rec = body["tensors"][rng.choice(names)]
        if op == "offset":
            rec["shards"][0]["offset"] += rng.choice((1, -1, 7))
        elif op == "global_shape":
            rec["global_shape"] = rec["global_shape"] + [2] if rng.random() < 0.5 else [3] + rec["global_shape"]
        elif op == "dtype":
            rec["dtype"] = rng.choice([d for d in ("float32", "int32", "bfloat16", "float16", "int64", "float64")
                                       if d != rec["dtype"]])
        else:
            rec["shards"][0]["crc32"] ^= 1 << rng.randrange(32)
    elif op == "size":
        rec = body["files"][SHARD]
        rec["size"] += rng.choice((1, -1))
        reseal_manifest(step_dir, body, redigest=False)
        return op
    else:
        return _reseal_envelope(step_dir, body, rng)
    reseal_manifest(step_dir, body)
    return op


def _reseal_envelope(step_dir: Path, body: dict[str, Any], rng: random.Random) -> str:
    fmt, version = rng.choice([(FORMAT, 1), (FORMAT, 3), (TRACE_FORMAT, VERSION), ("other", VERSION)])
    (step_dir / MANIFEST).write_bytes(seal(body, fmt, version))
    return f"envelope {fmt} v{version}"


def _config_ok(body: dict[str, Any], path: list[str], v: Any) -> bool:
    """Would replacing the manifest's config value at path by v still be a valid config (oracle)?"""
    if path[0] != "config":
        return False
    cfg = json.loads(json.dumps(body["config"]))
    t = cfg
    for k in path[1:-1]:
        t = t[int(k)] if isinstance(t, list) else t[k]
    t[path[-1]] = v
    return oracle_valid(cfg)


def header_edit(step_dir: Path, rng: random.Random) -> str:
    """Change one tensor's dtype or shape in the safetensors header (same byte length where possible)."""
    p = step_dir / SHARD
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    key = rng.choice([k for k in header if k != "__metadata__" and header[k]["dtype"] == "F32" and header[k]["shape"]])
    if rng.random() < 0.6:
        header[key]["dtype"] = rng.choice(("I32", "U32"))
        what = f"dtype F32->{header[key]['dtype']} of {key}"
    else:
        s = header[key]["shape"]
        header[key]["shape"] = [math.prod(s)] if len(s) > 1 else [1, s[0]]
        what = f"shape {s}->{header[key]['shape']} of {key}"
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((-len(text)) % 8)
    p.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    if rng.random() < 0.7:  # with digests recomputed: only the header-vs-manifest check can catch it
        reseal_manifest(step_dir, manifest_body(step_dir))
        what += " (resealed)"
    return what


def path_escape(step_dir: Path, rng: random.Random) -> str:
    """Point a shard at a file outside the checkpoint (a real one: followed, it would load)."""
    body = manifest_body(step_dir)
    older = sorted(p for p in step_dir.parent.iterdir() if p.name.startswith("step_") and p != step_dir)[0]
    target = rng.choice([f"../{older.name}/{SHARD}", str((older / SHARD).resolve()), f"sub/../../{older.name}/{SHARD}",
                         "/etc/passwd", "..", f"./{SHARD}"])
    rec = body["files"].pop(SHARD)
    body["files"][target] = rec
    for t in body["tensors"].values():
        for s in t["shards"]:
            s["file"] = target
    write_sealed(step_dir / MANIFEST, body, FORMAT, VERSION)
    return f"shard path {target!r}"


def structural_trace(body: dict[str, Any], rng: random.Random) -> str:
    op = rng.choice(("huge_layers", "meta_list", "calibration_str", "swap", "records", "column", "delete",
                     "unknown", "version"))
    if op == "huge_layers":
        body[rng.choice(("num_layers", "num_experts", "top_k"))] = rng.choice((2**40, 0, -1, 70000))
    elif op == "meta_list":
        body["meta"] = list(body["meta"])
    elif op == "calibration_str":
        body["meta"]["calibration"] = "fast"
    elif op == "swap":
        return "swap " + swap_value(body, rng, _trace_value_ok)
    elif op == "records":
        body["num_records"] += rng.choice((1, -1))
    elif op == "column":
        return "column " + _bad_column(body, rng)
    elif op == "delete":
        del body[rng.choice([k for k in body if k != "format"])]
    elif op == "unknown":
        body["extra"] = 1
    else:
        body["version"] = rng.choice((1, 3, "2"))
    return op


def _trace_value_ok(path: list[str], v: Any) -> bool:
    """Would v at path still be a valid trace? Free-form meta entries, and a non-negative int where
    the calibration holds a float (a number is a number)."""
    if path[0] != "meta" or len(path) < 2:
        return False
    if path[1] not in ("d_model", "d_expert", "expert_bytes", "dtype", "router_position", "source", "run",
                       "calibration"):
        return True
    floats = ("copy_s", "act_s_per_token", "attn_s", "copy_gbps", "host_s", "device_s")
    return path[1] == "calibration" and len(path) > 2 and path[2] in floats and _int(v) and v >= 0 and (
        path[2] not in ("host_s", "device_s") or len(path) == 4)


def _bad_column(body: dict[str, Any], rng: random.Random) -> str:
    """A column edit that no recorder can produce: ids out of range, NaN scores, a repeated expert."""
    K = body["top_k"]
    name = rng.choice(("experts", "layer", "scores", "pos", "dup"))
    if name == "dup":
        e = np.frombuffer(body["experts"], "<u2").copy().reshape(-1, K)
        row = rng.randrange(len(e))
        e[row, 1] = e[row, 0]
        body["experts"] = e.tobytes()
        return "repeated expert"
    dt = {"experts": "<u2", "layer": "<u2", "scores": "<f4", "pos": "<i4"}[name]
    a = np.frombuffer(body[name], dt).copy()
    a[rng.randrange(len(a))] = {"experts": body["num_experts"], "layer": body["num_layers"], "scores": np.nan,
                                "pos": -1}[name]
    body[name] = a.tobytes()
    return name
