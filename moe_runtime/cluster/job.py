"""Cluster training on Ray Train: the Python API, the `moe train --workers N` flags, the worker function.

    moe train --preset tiny --workers 2 --ep 2 --cpus-per-worker 1 --storage /abs/runs
    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json "$(python -m moe_runtime.cluster.job --print-runtime-env)" \\
        -- python -m moe_runtime train --preset tiny --workers 2 --ep 2 --storage "$PWD/runs"

Python:
    from moe_runtime.cluster.job import ClusterTrainer
    from moe_runtime.cluster.layout import ClusterConfig
    summary = ClusterTrainer(run, ClusterConfig(workers=4, ep=2, storage="s3://bucket/runs")).fit()

A job is one Ray Train `TorchTrainer`: ScalingConfig (one placement-group bundle per worker: a GPU,
or `cpus_per_worker` cores), TorchConfig (gloo or NCCL, `collective_timeout_s`), RunConfig
(storage_path, FailureConfig(max_failures), CheckpointConfig(num_to_keep)). Ray Train owns the
worker group, process-group setup, restarts and checkpoint storage; each worker runs `rank_main`:
core.train.Trainer's loop with cluster.plan.EPPlan. Checkpoints land in <storage>/<run name>/step_N
and a run resumes from the newest valid one there, whichever invocation or attempt wrote it.
Errors that a restart cannot fix (configuration, disk) end the run at once, as one line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

from moe_runtime.cluster.layout import ClusterConfig, check_resources, validate_cluster
from moe_runtime.core.config import RunConfig, TrainConfig
from moe_runtime.core.data import TOKEN_SUFFIXES
from moe_runtime.core.modelio import join_uri

try:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
except ImportError as e:  # pragma: no cover - exercised by tests/test_cli.py in a subprocess
    raise ImportError(f"cluster training needs Ray Train ({e}); install it with `pip install 'moe-runtime[ray]'`") from e

RUNTIME_ENV_EXCLUDES = [".git", ".venv", "venv", "runs", "**/__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
                        ".ruff_cache", "*.egg-info", "build", "dist", ".whl", ".gl", "bench/results/*.png"]
REPO_ROOT = Path(__file__).resolve().parents[2]  # moe_runtime/cluster/job.py -> the checkout


class ClusterTrainingError(RuntimeError):
    """The run failed more than max_failures times; the message names the rank and the cause."""


class ClusterFatalError(ValueError):
    """A configuration or storage error: the run stopped at once, without a retry (one line)."""


def runtime_env(working_dir: str | Path | None = None) -> dict[str, Any]:
    """The runtime_env that ships this repository to the cluster's workers."""
    env: dict[str, Any] = {"excludes": list(RUNTIME_ENV_EXCLUDES)}
    if working_dir is not None:
        env["working_dir"] = str(working_dir)
    return env


def in_ray_job() -> bool:
    """True inside a `ray job submit` entrypoint (its cwd is a temporary copy of the working dir)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def resolve_storage(storage: str | None, default_name: str = "runs") -> tuple[str, str]:
    """(storage_path for Ray Train, a note saying how it was resolved). URIs pass through; relative
    paths are resolved against the current directory, except inside `ray job submit`, where the
    current directory is Ray's temporary copy and anything written there is lost: refused."""
    s = storage if storage is not None else default_name
    if "://" in s:
        return s, f"storage {s}"
    p = Path(s).expanduser()
    if p.is_absolute():
        return str(p), f"storage {p}"
    if in_ray_job():
        raise ClusterFatalError(f"--storage {s} is a relative path, and inside `ray job submit` the current directory "
                                f"is Ray's temporary copy of --working-dir (lost when the job ends); pass an absolute "
                                f"path or a URI, e.g. --storage \"$PWD/{s}\" or --storage s3://bucket/{s}")
    return str(p.resolve()), f"storage {p.resolve()} (relative path {s!r} resolved against {Path.cwd()})"


def preflight_storage(storage: str) -> None:
    """Fail before any worker starts if a local storage directory cannot be written."""
    if "://" in storage:
        return
    probe = Path(storage) / f".moe-write-probe-{os.getpid()}"
    try:
        Path(storage).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise ClusterFatalError(f"storage {storage} is not writable ({e.strerror or e}); pass a writable --storage "
                                f"directory or URI") from None


def ensure_ray(address: str | None = None) -> bool:
    """ray.init() unless Ray is initialised; returns whether this call started it. With no address:
    the cluster of RAY_ADDRESS (ray job submit sets it), else a new embedded local one (never a
    stale or foreign cluster found on the machine; pass address='auto' to join a running one)."""
    if ray.is_initialized():
        return False
    if address is not None:
        ray.init(address=address, runtime_env=runtime_env(REPO_ROOT))
    elif "RAY_ADDRESS" in os.environ:
        ray.init()
    else:
        ray.init(address="local", include_dashboard=False)
    return True


def resolve_use_gpu(run: RunConfig, cfg: ClusterConfig, resources: dict[str, float]) -> bool:
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    device = run.train.device
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        return True
    return resources.get("GPU", 0.0) >= cfg.workers


class ClusterTrainer:
    """Data x expert parallel training as a Ray Train TorchTrainer (see module docstring)."""

    def __init__(self, run: RunConfig, cluster: ClusterConfig, *, data: str | Path | None = None,
                 progress: bool = True, plots: bool = True, hf: str | Path | None = None):
        self.cluster = validate_cluster(run, dataclasses.replace(cluster))  # refused before any worker starts
        self.hf = str(Path(hf).resolve()) if hf is not None else None
        if self.hf is not None and self.cluster.offload_experts:
            raise ClusterFatalError("hf= with offload_experts: the host expert shards are built from the seeded "
                                    "initialisation; fine-tune a Hugging Face checkpoint without --offload-experts")
        self.run = run
        self.storage, self.storage_note = resolve_storage(self.cluster.storage)
        self.data = str(Path(data).resolve()) if data is not None else None
        if self.data is not None and not Path(self.data).exists():
            raise ClusterFatalError(f"--data {data}: {self.data} does not exist; pass a text file, a directory of "
                                    f"text files or a .bin token file visible to every worker")
        self.progress, self.plots = progress, plots

    @classmethod
    def from_hf(cls, path: str | Path, train_config: TrainConfig | None = None, cluster: ClusterConfig | None = None,
                *, moe_overrides: dict[str, Any] | None = None, **kw: Any) -> "ClusterTrainer":
        """Fine-tune a local Hugging Face MoE checkpoint with expert parallelism: each rank builds its
        model on the meta device and reads only the dense tensors and its own experts from the
        safetensors shards (core.hf.load_hf_weights(expert_rows=...)); no rank loads the whole model."""
        from moe_runtime.core.hf import hf_run_config, load_tokenizer
        ck, run = hf_run_config(path, train_config, moe_overrides=moe_overrides)
        data = kw.get("data")
        if load_tokenizer(ck.path) is not None and (data is None or Path(data).suffix not in TOKEN_SUFFIXES):
            raise ClusterFatalError(f"{ck.path} has a tokenizer: with workers pass data= a token file "
                                    f"({'/'.join(TOKEN_SUFFIXES)}) tokenized with it (every worker reads it)")
        return cls(run, cluster or ClusterConfig(workers=1), hf=ck.path, **kw)

    @property
    def run_uri(self) -> str:
        """Where this run's checkpoints and metrics.jsonl live: <storage>/<run name>."""
        return join_uri(self.storage, self.run.name)

    def fit(self, *, resume: bool = True) -> dict[str, Any]:
        """Train; returns rank 0's summary. Raises ClusterFatalError (not retried) or
        ClusterTrainingError (after more than max_failures worker failures)."""
        cfg = self.cluster
        preflight_storage(self.storage)
        ensure_ray(cfg.ray_address)
        resources = ray.cluster_resources()
        use_gpu = resolve_use_gpu(self.run, cfg, resources)
        check_resources(dataclasses.replace(cfg, use_gpu=use_gpu), resources)
        board = ray.remote(_board_cls()).options(num_cpus=0).remote(cfg.workers)
        if self.progress:
            print(f"[cluster] {cfg.workers} {'GPU' if use_gpu else 'CPU'} workers, ep={cfg.ep} "
                  f"({self.run.model.moe.num_experts // cfg.ep} experts per worker, {cfg.workers // cfg.ep} "
                  f"replica(s)); {self.storage_note}; run dir {self.run_uri}", flush=True)
        trainer = TorchTrainer(
            _rank_main(), train_loop_config=self._spec(use_gpu, resume, board),
            scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, placement_strategy="PACK",
                                         resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(max(1, cfg.collective_timeout_s))),
            run_config=RayRunConfig(name=self.run.name, storage_path=self.storage,
                                    failure_config=FailureConfig(max_failures=cfg.max_failures),
                                    checkpoint_config=CheckpointConfig(num_to_keep=self.run.train.keep_checkpoints)))
        error: Exception | None = None
        try:
            result = trainer.fit()
            error = getattr(result, "error", None)
        except Exception as e:  # noqa: BLE001 - Ray Train's TrainingFailedError and friends: rephrased below
            error = e
        state = ray.get(board.state.remote())
        ray.kill(board)
        if state["fatal"]:
            raise ClusterFatalError(state["fatal"][0])
        if error is not None or state["summary"] is None:
            raise ClusterTrainingError(f"training failed (max_failures={cfg.max_failures}): "
                                       f"{state['hang'] or _first_line(error)}. The newest valid checkpoint in "
                                       f"{self.run_uri} is kept; rerun to resume") from error
        summary = state["summary"]
        summary["per_rank"] = [state["ranks"].get(r) for r in range(cfg.workers)]
        summary["layout"] = {"workers": cfg.workers, "ep": cfg.ep, "replicas": cfg.workers // cfg.ep,
                             "backend": "nccl" if use_gpu else "gloo", "offload_experts": cfg.offload_experts}
        return summary

    def _spec(self, use_gpu: bool, resume: bool, board) -> dict[str, Any]:
        """What a worker needs, as plain values (and the board's actor handle); never tensors."""
        run = self.run.to_dict()
        run["train"]["device"] = "cuda" if use_gpu else "cpu"
        c = self.cluster
        return {"run": run, "ep": c.ep, "data": self.data, "run_uri": self.run_uri, "offload": c.offload_experts,
                "overlap": c.overlap_grad_sync == "on" or (c.overlap_grad_sync == "auto" and use_gpu),
                "progress": self.progress, "plots": self.plots and "://" not in self.run_uri, "resume": resume,
                "threads": max(1, int(c.cpus_per_worker)), "board": board, "hf": self.hf, "invocation": uuid.uuid4().hex,
                "collective_timeout_s": c.collective_timeout_s, "fault": c.fault.to_dict() if c.fault else None}


def _rank_main():
    from moe_runtime.cluster.worker import rank_main
    return rank_main


def _board_cls():
    from moe_runtime.cluster.board import RunBoard
    return RunBoard


def _first_line(e: BaseException | None) -> str:
    text = str(e) if e is not None else "no summary from rank 0"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:  # Ray's message lists each worker's error; prefer ours
        if "stopped responding" in ln or "died" in ln.lower():
            return ln
    return lines[0] if lines else type(e).__name__


# ---------------------------------------------------------------------- `moe train --workers N`
def run_cluster_train(run: RunConfig, args: argparse.Namespace) -> dict[str, Any]:
    """What `moe train --workers N` calls."""
    if args.out is not None:
        raise ClusterFatalError(f"--out {args.out} is for one-process runs; with --workers pass --storage DIR_OR_URI "
                                f"(the run goes to <storage>/<name>)")
    cfg = ClusterConfig(workers=args.workers, ep=args.ep, max_failures=args.max_failures,
                        offload_experts=args.offload_experts, cpus_per_worker=args.cpus_per_worker,
                        overlap_grad_sync=args.overlap_grad_sync,
                        collective_timeout_s=args.collective_timeout, storage=args.storage,
                        ray_address=args.ray_address)
    return ClusterTrainer(run, cfg, data=args.data, progress=not args.no_progress).fit(resume=not args.no_resume)


def main(argv: list[str] | None = None) -> int:
    """`python -m moe_runtime.cluster.job --print-runtime-env`: the runtime_env JSON for `ray job submit`."""
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m moe_runtime.cluster.job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--print-runtime-env", action="store_true", help="print the runtime_env JSON and exit")
    args = p.parse_args(argv)
    if args.print_runtime_env:
        print(json.dumps(runtime_env()))
        return 0
    p.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
