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
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from moe_runtime.core.checkpoint import MANIFEST, Checkpoint, CheckpointError, ResumeMismatch, resume_check
from moe_runtime.core.config import ConfigError, RunConfig, load_config
from moe_runtime.core.data import Corpus  # noqa: F401  (tests build their corpora from here)
from moe_runtime.core.hf.config import HFCheckpointError
from moe_runtime.core.manifest import FORMAT, VERSION
from moe_runtime.core.serial import DecodeError, seal, unseal
from moe_runtime.offload.trace import TRACE_FORMAT, TRACE_VERSION, RoutingTrace, TraceError, recorder_for
from tests.fuzz_mutations import (SHARD, bit_flip, bomb_file, header_edit, manifest_body, path_escape,  # noqa: F401
                                  random_bytes, reseal_manifest, structural_checkpoint, structural_trace,
                                  trailing_data, truncation)
from tests.fuzz_oracle import mutate_config, oracle_valid

ERRORS = (CheckpointError, TraceError, ConfigError, DecodeError, HFCheckpointError, ResumeMismatch)
FAILURES = ("silent_wrong_load", "over_refused", "unnamed_refusal", "crash", "hang", "memory")
HANG_S = 20
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
    from moe_runtime.core.config import MoEConfig, ModelConfig, TrainConfig
    from moe_runtime.core.model import MoETransformer
    from moe_runtime.core.train import Trainer

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
            f.write_bytes(_BYTE_MUTATIONS[kind](f.read_bytes(), rng))
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
            p.write_bytes(_BYTE_MUTATIONS[kind](raw, rng))
            detail = kind
        return (lambda: RoutingTrace.load(p), lambda t: "identical" if _same_trace(t, seeds.trace_obj)
                else "silent_wrong_load", p, detail)
    fmt = rng.choice(("toml", "json")) if kind in ("bit_flip", "truncation", "random_bytes") else "json"
    p = case_dir / f"run.{fmt}"
    if kind in ("bit_flip", "truncation", "random_bytes"):
        p.write_bytes(_BYTE_MUTATIONS[kind](seeds.configs[fmt].read_bytes(), rng))
        detail = f"{kind} of {fmt}"
    else:
        d, detail = mutate_config(seeds.run.to_dict(), kind, rng)
        p.write_text(json.dumps(d))
    return lambda: load_config(p), lambda run: _classify_config(p, run), p, detail


_BYTE_MUTATIONS = {"bit_flip": bit_flip, "truncation": truncation, "random_bytes": random_bytes,
                   "trailing_data": trailing_data}


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
