"""Seeded mutations of real checkpoints, routing traces and configs, each loaded and classified.

One generator for the fuzz tier (tests/test_fuzz.py, a few hundred cases in the default run) and
the larger run (`python bench/fuzz.py --cases 2000`). `make_seeds` writes the real files (a
checkpoint of a 6-step training run, a routing trace recorded from a forward pass, TOML and JSON
configs); `cases(n, seed)` lists (target, kind, case seed); `run_case` copies the seed file, applies
the mutation, loads it the way the runtime does and classifies the outcome:

    refused            one of the project's error types (the message names the file)
    identical          loaded, and equal to the original (the mutation changed nothing that matters)
    valid              a config the independent oracle below also calls valid (configs have no digest)
  failures:
    silent_wrong_load  loaded, and differs from the original (or an invalid config was accepted)
    over_refused       a config the oracle calls valid was refused
    crash              any exception outside the project's error types
    hang               over HANG_S seconds
    memory             peak RSS growth over 4 x the file size + 200 MB
"""
from __future__ import annotations

import json
import math
import random
import re
import shutil
import signal
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import torch

from moe.checkpoint import (MANIFEST, Checkpoint, CheckpointError, ResumeMismatch, read_sealed, resume_check,
                            write_sealed)
from moe.config import ConfigError, RunConfig, load_config
from moe.data import Corpus
from moe.hf.config import HFCheckpointError
from moe.manifest import FORMAT, VERSION
from moe.serial import DecodeError, file_digest, seal, unseal
from offload.trace import TRACE_FORMAT, TRACE_VERSION, RoutingTrace, TraceError, recorder_for

ERRORS = (CheckpointError, TraceError, ConfigError, DecodeError, HFCheckpointError, ResumeMismatch)
FAILURES = ("silent_wrong_load", "over_refused", "unnamed_refusal", "crash", "hang", "memory")
HANG_S = 20
SHARD = "model-rank00000.safetensors"
KINDS = {
    "checkpoint": ("bit_flip", "truncation", "random_bytes", "trailing_data", "header_edit", "msgpack_bomb",
                   "structural_swap", "path_escape"),
    "trace": ("bit_flip", "truncation", "random_bytes", "trailing_data", "msgpack_bomb", "structural_swap"),
    "config": ("bit_flip", "truncation", "random_bytes", "structural_swap", "type_swap", "range"),
}


class Hang(BaseException):
    """Raised by the alarm; a BaseException so that no `except Exception` in the code under test eats it."""


@dataclass
class Seeds:
    dir: Path
    ckpt_root: Path
    step_dir: Path
    """The newest checkpoint (the one mutated); an older one sits next to it."""
    trace: Path
    configs: dict[str, Path]
    run: RunConfig
    params: list[str]
    tensors: dict[str, torch.Tensor]
    manifest: dict[str, Any]
    trace_obj: RoutingTrace


def make_seeds(workdir: Path) -> Seeds:
    """Train a small model for 6 steps (checkpoints at 3 and 6), record a trace, write configs."""
    from moe.config import MoEConfig, ModelConfig, TrainConfig
    from moe.model import MoETransformer
    from moe.train import Trainer

    workdir.mkdir(parents=True, exist_ok=True)
    run = RunConfig(name="fuzz", model=ModelConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                                                   moe=MoEConfig(num_experts=4, top_k=2, d_expert=24)),
                    train=TrainConfig(max_steps=6, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=2, eval_interval=6,
                                      eval_batches=1, log_interval=6, ckpt_interval=3, device="cpu"))
    g = torch.Generator().manual_seed(0)
    corpus = Corpus(torch.randint(0, 256, (4000,), generator=g), torch.randint(0, 256, (500,), generator=g),
                    "random bytes", 256)
    torch.manual_seed(0)
    trainer = Trainer(run, out_dir=workdir / "run", corpus=corpus, progress=False, plots=False)
    trainer.fit()
    root = trainer.ckpt_root
    step_dir = root / "step_00000006"
    ck = Checkpoint(step_dir).verify()
    model = MoETransformer(run.model).eval()
    rec = recorder_for(model, meta={"source": "fuzz", "expert_bytes": 1234, "calibration": {
        "device": "cpu", "expert_bytes": 1234, "copy_s": 1e-4, "tokens": [1, 4, 16], "host_s": [1e-5, 2e-5, 5e-5],
        "device_s": [1e-6, 2e-6, 4e-6], "act_s_per_token": 1e-7, "attn_s": 1e-5, "copy_gbps": 12.3}})
    with rec.attach(model), torch.no_grad():
        model(torch.randint(0, 256, (2, 12), generator=g))
    trace = rec.to_trace()
    trace_path = trace.save(workdir / "trace.msgpack")
    configs = {"toml": workdir / "run.toml", "json": workdir / "run.json"}
    configs["json"].write_text(json.dumps(run.to_dict(), indent=1))
    configs["toml"].write_text(_toml(run.to_dict()))
    assert load_config(configs["toml"]).model == run.model
    return Seeds(workdir, root, step_dir, trace_path, configs, run,
                 [n for n, p in trainer.model.named_parameters()], ck.state_dict(), ck.manifest.to_dict(),
                 RoutingTrace.load(trace_path))


def _toml(d: dict[str, Any]) -> str:
    """A RunConfig dict as TOML (no None values: they are left out, i.e. defaults)."""
    def table(name: str, t: dict[str, Any]) -> list[str]:
        lines = [f"[{name}]"] if name else []
        lines += [f"{k} = {json.dumps(v)}" for k, v in t.items() if v is not None and not isinstance(v, dict)]
        return lines
    lines = table("", {"name": d["name"]}) + table("model", d["model"]) + table("model.moe", d["model"]["moe"])
    return "\n".join(lines + table("train", d["train"])) + "\n"


def cases(n: int, seed: int) -> list[tuple[str, str, int]]:
    """n (target, kind, case seed) triples, round-robin over targets and kinds (deterministic)."""
    flat = [(t, k) for t, ks in KINDS.items() for k in ks]
    rng = random.Random(seed)
    return [(*flat[i % len(flat)], rng.randrange(2**31)) for i in range(n)]


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
    return msgpack.packb({"format": fmt, "version": version, "sha256": __import__("hashlib").sha256(
        msgpack.packb([fmt, version, bomb], use_bin_type=True)).digest(), "body": bomb}, use_bin_type=True)


# ---------------------------------------------------------------- structural mutations (resealed)
_OTHER_VALUES = [None, True, 1.5, -7, 2**40, "x", "", [], [1, 2], {}, {"a": 1}, b"\x00"]


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
    """Manifest values any type of which is legitimate: layout, extra train_state entries."""
    return path[0] == "layout" or (path[0] == "train_state" and path[1:2] != ["step"])


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


# ---------------------------------------------------------------- configs: an independent oracle
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
        "balance_pooling": lambda v: v in ("per_layer", "pooled")}
_MODEL = {"d_model": _pos, "n_layers": _pos, "n_heads": _pos, "vocab_size": _pos, "max_seq_len": _pos,
          "n_kv_heads": lambda v: v is None or _pos(v), "head_dim": lambda v: v is None or (_pos(v) and v % 2 == 0),
          "rope_theta": lambda v: _num(v) and v > 0, "norm_eps": lambda v: _num(v) and v > 0,
          "first_dense_layers": lambda v: _int(v) and v >= 0, "d_dense_ffn": lambda v: v is None or _pos(v),
          "tie_embeddings": lambda v: isinstance(v, bool), "qkv_bias": lambda v: isinstance(v, bool),
          "qk_norm": lambda v: v in (None, "full", "head"), "init_std": _nonneg_num}
_TRAIN = {**{k: _pos for k in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_interval",
                               "eval_interval")},
          "lr": lambda v: _num(v) and v > 0, "min_lr_ratio": lambda v: _num(v) and 0 <= v <= 1,
          "warmup_steps": lambda v: _int(v) and v >= 0, "weight_decay": _nonneg_num,
          "beta1": lambda v: _num(v) and 0 <= v < 1, "beta2": lambda v: _num(v) and 0 <= v < 1,
          "grad_clip": _nonneg_num, "seed": lambda v: _int(v) and 0 <= v < 2**63,
          "ckpt_interval": lambda v: _int(v) and v >= 0, "keep_checkpoints": _pos,
          "device": lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d{1,3})?", v) is not None,
          "autocast_bf16": lambda v: isinstance(v, bool), "threads": lambda v: _int(v) and v >= 0}
_REQUIRED = {"moe": ("num_experts", "top_k", "d_expert"), "model": ("d_model", "n_layers", "n_heads")}


def oracle_valid(d: Any) -> bool:
    """The documented config rules, restated independently of moe/config.py."""
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


# ---------------------------------------------------------------- running one case
def _rss_reset() -> int:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status("VmRSS")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _alarm(signum, frame):
    raise Hang()


def _same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(
        a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


def _same_trace(a: RoutingTrace, b: RoutingTrace) -> bool:
    return ((a.num_layers, a.num_experts, a.top_k, a.meta) == (b.num_layers, b.num_experts, b.top_k, b.meta)
            and all(np.array_equal(getattr(a, c), getattr(b, c)) for c in ("step", "seq", "pos", "layer", "experts"))
            and a.scores.tobytes() == b.scores.tobytes())


def _prepare(seeds: Seeds, target: str, kind: str, rng: random.Random, case_dir: Path, bomb_mb: float
             ) -> tuple[Callable[[], Any], Callable[[Any], str], Path, str]:
    """Copy and mutate the seed; return (load, classify-a-load, mutated path, what was done)."""
    if target == "checkpoint":
        root = case_dir / "checkpoints"
        shutil.copytree(seeds.ckpt_root, root)
        step = root / seeds.step_dir.name
        if kind in ("bit_flip", "truncation", "random_bytes", "trailing_data"):
            f = step / (MANIFEST if kind == "trailing_data" or rng.random() < 0.5 else SHARD)
            f.write_bytes(globals()[kind](f.read_bytes(), rng))
            detail = f"{kind} of {f.name}"
        elif kind == "msgpack_bomb":
            (step / MANIFEST).write_bytes(bomb_file(rng, bomb_mb, FORMAT, VERSION))
            detail = "bomb manifest"
        else:
            detail = {"header_edit": header_edit, "structural_swap": structural_checkpoint,
                      "path_escape": path_escape}[kind](step, rng)

        def load() -> Any:
            ck = Checkpoint(step).verify()
            RunConfig.from_dict(ck.manifest.config, source=str(step / MANIFEST))
            resume_check(seeds.run.to_dict(), seeds.params)(ck)
            return ck
        same = lambda ck: ck.manifest.to_dict() == seeds.manifest and _same_tensors(ck.state_dict(), seeds.tensors)  # noqa: E731
        return load, lambda r: "identical" if same(r) else "silent_wrong_load", step, detail
    if target == "trace":
        p = case_dir / "trace.msgpack"
        raw = seeds.trace.read_bytes()
        if kind == "msgpack_bomb":
            p.write_bytes(bomb_file(rng, bomb_mb, TRACE_FORMAT, TRACE_VERSION))
            detail = "bomb"
        elif kind == "structural_swap":
            body = unseal(raw, TRACE_FORMAT, TRACE_VERSION, "seed", 1 << 30)
            detail = structural_trace(body, rng)
            p.write_bytes(seal(body, TRACE_FORMAT, TRACE_VERSION))
        else:
            p.write_bytes(globals()[kind](raw, rng))
            detail = kind
        return (lambda: RoutingTrace.load(p), lambda t: "identical" if _same_trace(t, seeds.trace_obj)
                else "silent_wrong_load", p, detail)
    fmt = rng.choice(("toml", "json")) if kind in ("bit_flip", "truncation", "random_bytes") else "json"
    p = case_dir / f"run.{fmt}"
    if kind in ("bit_flip", "truncation", "random_bytes"):
        p.write_bytes(globals()[kind](seeds.configs[fmt].read_bytes(), rng))
        detail = f"{kind} of {fmt}"
    else:
        d, detail = mutate_config(seeds.run.to_dict(), kind, rng)
        p.write_text(json.dumps(d))
    return lambda: load_config(p), lambda run: _classify_config(p, run), p, detail


def _parsed(p: Path) -> Any:
    import tomllib
    try:
        d = tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except Exception:  # any parse failure: the loader must refuse
        return None
    if isinstance(d, dict):
        d.setdefault("name", p.stem)
    return d


def _classify_config(p: Path, run: RunConfig) -> str:
    d = _parsed(p)
    if d is None or not oracle_valid(d):
        return "silent_wrong_load"
    got = run.to_dict()
    for sec, name in ((d["model"]["moe"], ("model", "moe")), (d["model"], ("model",)), (d["train"] or {}, ("train",))):
        ref = got
        for n in name:
            ref = ref[n]
        if any(k != "moe" and v is not None and ref[k] != v for k, v in sec.items()):
            return "silent_wrong_load"
    return "valid"


def run_case(seeds: Seeds, target: str, kind: str, case_seed: int, workdir: Path, bomb_mb: float = 2.0
             ) -> dict[str, Any]:
    """Mutate, load, classify one case (see module docstring); never raises."""
    rng = random.Random(case_seed)
    case_dir = workdir / "case"
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    load, classify, path, detail = _prepare(seeds, target, kind, rng, case_dir, bomb_mb)
    nbytes = sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size
    message = ""
    old = signal.signal(signal.SIGALRM, _alarm)
    rss0 = _rss_reset()
    t0 = time.perf_counter()
    signal.alarm(HANG_S)
    try:
        outcome = classify(load())
    except ERRORS as e:
        message = str(e)
        outcome = "refused" if str(case_dir) in message else "unnamed_refusal"
    except Hang:
        outcome = "hang"
    except Exception as e:  # classified, never raised: any other type is a crash
        outcome, message = "crash", f"{type(e).__name__}: {e}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - t0
    growth = max(0, _status("VmHWM") - rss0)
    if growth > 4 * nbytes + 200 * 2**20 and outcome not in FAILURES:
        outcome = "memory"
    if target == "config" and outcome == "refused" and _parsed(path) is not None and oracle_valid(_parsed(path)):
        outcome = "over_refused"
    return {"target": target, "kind": kind, "seed": case_seed, "detail": detail, "outcome": outcome,
            "message": message[:300], "seconds": round(seconds, 4), "file_bytes": nbytes, "peak_growth_bytes": growth}
