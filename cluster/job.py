"""Cluster training entrypoint: the Python API, the `moe train --workers N` hook, and a script.

    python -m cluster.job --preset tiny --workers 2 --ep 2 --max-steps 50 --out runs/tiny-ep2
    ray job submit --working-dir . --runtime-env-json "$(python -m cluster.job --print-runtime-env)" \\
        -- python -m moe train --preset tiny --workers 2 --ep 2

Python:
    from cluster.job import ClusterTrainer
    from cluster.layout import ClusterConfig
    summary = ClusterTrainer(run, ClusterConfig(workers=4, ep=2), out_dir="runs/x").fit()

The same code runs on a laptop (`ray.init()` starts an embedded local Ray cluster), inside
`ray job submit` (RAY_ADDRESS is set: it joins that cluster and the job's runtime_env already
carries the code) and against a running cluster from plain python (`--ray-address`: the repository
is shipped as the runtime_env's working_dir, without .git, runs/, caches or .venv).
Rank 0 owns progress lines and metrics.jsonl; the driver appends failure events between attempts.
Paths (out_dir, data) must be visible to every node: on several machines, use shared storage.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

from cluster.actors import WorkerGroup, create_placement_group, ray, remove_placement_group
from cluster.fault import jsonl_logger, supervise
from cluster.layout import ClusterConfig, check_resources, validate_cluster
from moe.config import RunConfig

RUNTIME_ENV_EXCLUDES = [".git", ".venv", "venv", "runs", "**/__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
                        ".ruff_cache", "*.egg-info", "build", "dist", ".whl", ".gl", "bench/results/*.png"]
REPO_ROOT = Path(__file__).resolve().parent.parent


def runtime_env(working_dir: str | Path | None = None) -> dict[str, Any]:
    """The runtime_env that ships this repository to the cluster's workers."""
    env: dict[str, Any] = {"excludes": list(RUNTIME_ENV_EXCLUDES)}
    if working_dir is not None:
        env["working_dir"] = str(working_dir)
    return env


def ensure_ray(address: str | None = None) -> bool:
    """ray.init() unless Ray is initialised; returns whether this call started it. With no
    address: the cluster of RAY_ADDRESS (ray job submit), else a new embedded local one."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init()
    else:
        ray.init(address=address, runtime_env=runtime_env(REPO_ROOT))
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
    """Data x expert parallel training on Ray actors, with recovery (see cluster/fault.py)."""

    def __init__(self, run: RunConfig, cluster: ClusterConfig, *, out_dir: str | Path | None = None,
                 data: str | Path | None = None, progress: bool = True, plots: bool = True, timer_sync: bool = False):
        self.cluster = validate_cluster(run, dataclasses.replace(cluster))  # refused before any actor starts
        self.run = run
        self.out_dir = Path(out_dir if out_dir is not None else Path("runs") / run.name).resolve()
        self.data = str(Path(data).resolve()) if data is not None else None
        self.progress, self.plots, self.timer_sync = progress, plots, timer_sync

    def fit(self, *, resume: bool = True, until_step: int | None = None) -> dict[str, Any]:
        """Train; returns rank 0's summary (+ failures, layout). Raises ClusterTrainingError after
        more than max_failures worker failures, ValueError for impossible configurations."""
        cfg = self.cluster
        ensure_ray(cfg.ray_address)
        resources = ray.cluster_resources()
        use_gpu = resolve_use_gpu(self.run, cfg, resources)
        check_resources(dataclasses.replace(cfg, use_gpu=use_gpu), resources)
        run_id = uuid.uuid4().hex
        log = jsonl_logger(self.out_dir / "metrics.jsonl")
        layout = {"workers": cfg.workers, "ep": cfg.ep, "replicas": cfg.workers // cfg.ep,
                  "backend": "nccl" if use_gpu else "gloo", "offload_experts": cfg.offload_experts}
        if self.progress:
            print(f"[cluster] {cfg.workers} {'GPU' if use_gpu else 'CPU'} workers, ep={cfg.ep} "
                  f"({self.run.model.moe.num_experts // cfg.ep} experts per worker, {layout['replicas']} replica(s)), "
                  f"run dir {self.out_dir}", flush=True)
        pg = create_placement_group(cfg, use_gpu)
        try:
            def attempt(n: int) -> dict[str, Any]:
                group = WorkerGroup(cfg, pg, use_gpu)
                try:
                    group.wait(group.call("setup", self._spec(n, use_gpu)))
                    # attempt 0 honours `resume`; later attempts resume from this job's own checkpoints
                    return group.wait(group.call("fit", resume if n == 0 else False, until_step, run_id))[0]
                finally:
                    group.kill()
            summary = supervise(attempt, cfg.max_failures, log)
        finally:
            remove_placement_group(pg)
        summary["layout"] = layout
        return summary

    def _spec(self, attempt: int, use_gpu: bool) -> dict[str, Any]:
        """What a worker needs, as plain values (Ray serialises this small dict; never tensors)."""
        run = self.run.to_dict()
        run["train"]["device"] = "cuda" if use_gpu else "cpu"
        return {"run": run, "ep": self.cluster.ep, "data": self.data, "out_dir": str(self.out_dir),
                "offload": self.cluster.offload_experts, "progress": self.progress, "plots": self.plots,
                "timer_sync": self.timer_sync, "attempt": attempt,
                "fault": self.cluster.fault.to_dict() if self.cluster.fault else None}


# ---------------------------------------------------------------------- the `moe train` hook
def add_train_cluster_args(parser: argparse.ArgumentParser) -> None:
    """Add the cluster flags this parser does not have yet (`moe train` already defines some)."""
    have = set(parser._option_string_actions)  # noqa: SLF001 - argparse has no public lookup
    flags = [("--workers", dict(type=int, default=0, help="train on N Ray actors (0: one process)")),
             ("--ep", dict(type=int, default=None, help="expert-parallel size (default: gcd(workers, experts))")),
             ("--max-failures", dict(type=int, default=3, help="worker failures to recover from")),
             ("--offload-experts", dict(action="store_true", help="expert shards + optimizer state in host memory")),
             ("--cpus-per-worker", dict(type=float, default=1.0, help="CPU cores per worker (its torch threads)")),
             ("--collective-timeout", dict(type=float, default=120.0, help="seconds before a stuck collective fails")),
             ("--ray-address", dict(default=None, help="Ray cluster to join (default: current or a local one)"))]
    for flag, kw in flags:
        if flag not in have:
            parser.add_argument(flag, **kw)


def cluster_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """run_cluster_train keyword arguments from parsed flags (absent flags keep their defaults)."""
    names = {"workers": "workers", "ep": "ep", "max_failures": "max_failures", "offload_experts": "offload_experts",
             "cpus_per_worker": "cpus_per_worker", "collective_timeout": "collective_timeout_s",
             "ray_address": "ray_address"}
    return {kw: getattr(args, a) for a, kw in names.items() if hasattr(args, a)}


def run_cluster_train(run: RunConfig, *, out_dir: str | Path, data: str | Path | None = None, workers: int,
                      ep: int | None = None, max_failures: int = 3, offload_experts: bool = False, resume: bool = True,
                      cpus_per_worker: float = 1.0, collective_timeout_s: float = 120.0, ray_address: str | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """What `moe train --workers N [--ep E]` calls: train `run` on N Ray workers; rank 0's summary."""
    cfg = ClusterConfig(workers=workers, ep=ep, max_failures=max_failures, offload_experts=offload_experts,
                        cpus_per_worker=cpus_per_worker, collective_timeout_s=collective_timeout_s,
                        ray_address=ray_address)
    return ClusterTrainer(run, cfg, out_dir=out_dir, data=data, progress=progress).fit(resume=resume)


def main(argv: list[str] | None = None) -> int:
    """`python -m cluster.job`: the cluster path without the `moe` CLI (e.g. for ray job submit)."""
    from moe.config import get_preset, load_config

    p = argparse.ArgumentParser(prog="python -m cluster.job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--config", default=None, help="TOML/JSON config (overrides --preset)")
    p.add_argument("--data", default=None)
    p.add_argument("--out", default=None)
    for flag in ("--max-steps", "--batch-size", "--seq-len"):
        p.add_argument(flag, type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--print-runtime-env", action="store_true", help="print the runtime_env JSON and exit")
    add_train_cluster_args(p)
    args = p.parse_args(argv)
    if args.print_runtime_env:
        print(json.dumps(runtime_env()))
        return 0
    run = load_config(args.config) if args.config else get_preset(args.preset)
    for flag in ("max_steps", "batch_size", "seq_len", "device"):
        if getattr(args, flag) is not None:
            setattr(run.train, flag, getattr(args, flag))
    run.train.eval_interval = min(run.train.eval_interval, run.train.max_steps)
    run = RunConfig.from_dict(run.to_dict(), source="command line")
    out = args.out or str(Path("runs") / run.name)
    summary = run_cluster_train(run, out_dir=out, data=args.data, resume=not args.no_resume,
                                **{**cluster_kwargs(args), "workers": max(1, args.workers)})
    ev = summary.get("last_eval") or {}
    print(f"[cluster] done at step {summary['step']}: final train loss {summary['final_loss']}, "
          f"val_loss {ev.get('val_loss')}, failures {summary['failures']}; metrics in {out}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
