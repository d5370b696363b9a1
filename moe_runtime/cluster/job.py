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
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from moe_runtime.cluster.layout import ClusterConfig, check_resources, validate_cluster
from moe_runtime.core.config import RunConfig, TrainConfig
from moe_runtime.core.data import TOKEN_SUFFIXES
from moe_runtime.core.modelio import join_uri

try:
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
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


class ClusterInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended the run; the message says at which step and what a rerun resumes from."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # 130 for SIGINT, 143 for SIGTERM


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
    return connect_ray(address)[0]


def connect_ray(address: str | None = None) -> tuple[bool, str]:
    """(whether this call started Ray, a line saying which Ray the run uses)."""
    if ray.is_initialized():
        return False, "using the Ray instance this process already joined"
    if address is not None:
        ray.init(address=address, runtime_env=runtime_env(REPO_ROOT))
        return True, f"joined the Ray cluster at {address} (--ray-address)"
    if "RAY_ADDRESS" in os.environ:
        ray.init()
        return True, f"joined the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}"
    start_embedded_ray()
    return True, ("started a private Ray instance for this run, on 127.0.0.1 only; it stops when the run ends "
                  "(to join a running cluster instead: --ray-address auto or RAY_ADDRESS)")


EMBEDDED_ENV = {
    # Ray resolves 127.0.0.1 to the machine's outward address ("remotely reachable") unless clusters are
    # off: then the node address is 127.0.0.1, and gcs_server, raylet, every worker's gRPC server, the
    # dashboard agent, runtime-env agent and metrics servers bind 127.0.0.1. Inherited by Ray's processes.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # gloo's connections between the ranks go over the loopback interface
    "GLOO_SOCKET_IFNAME": "lo",
}


def start_embedded_ray(**init_kw: Any) -> None:
    """ray.init() of a new single-machine Ray on 127.0.0.1 only (see EMBEDDED_ENV), no dashboard,
    without Ray's start-up chatter (token-auth warning, 'Started a local Ray instance'); init_kw
    (e.g. num_cpus) go to ray.init."""
    import ray._private.ray_constants as ray_constants
    saved = {k: os.environ.get(k) for k in EMBEDDED_ENV}
    for k, v in EMBEDDED_ENV.items():
        if k == "GLOO_SOCKET_IFNAME" and not Path("/sys/class/net/lo").exists():
            continue
        os.environ.setdefault(k, v)
    was = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at call time by services.get_node_ip_address
    quiet = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level=logging.WARNING, **init_kw)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was
        quiet.setLevel(level)
        for k, v in saved.items():  # Ray's processes have their copy; this process's environment is restored
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def train_env(cfg: ClusterConfig, embedded: bool) -> Iterator[None]:
    """Ray Train settings for this run, as the environment variables Ray Train propagates from the
    driver to its controller and workers (a value the user set wins); restored afterwards."""
    want = {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else every print of a worker reaches the console twice
        "RAY_TRAIN_COLLECTIVE_TIMEOUT_S": f"{cfg.collective_timeout_s:g}",  # ray.train.report's barrier
        # a worker that stops answering Ray Train's health poll is failed (and the group retried) after this
        "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S": f"{2 * cfg.collective_timeout_s + 10:g}",
    }
    if embedded:  # one machine: nothing is preempted (the watcher only logs an error line about its actor)
        want["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    if not sys.stdout.isatty():
        want["RAY_COLOR_PREFIX"] = "0"  # no ANSI colour codes in files and pipes
    saved = {k: os.environ.get(k) for k in want}
    for k, v in want.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _trainer_cls(embedded: bool):
    """TorchTrainer; on an embedded Ray without its PlacementGroupCleaner: that detached actor polls
    the controller through Ray's state API, which needs a dashboard and finds 'multiple active Ray
    instances' when two runs share a machine; the embedded Ray (and every placement group) ends
    with the run anyway."""
    if not embedded:
        return TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    class EmbeddedTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]
    return EmbeddedTorchTrainer


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
        """Train; returns rank 0's summary. Raises ClusterFatalError (not retried),
        ClusterTrainingError (after more than max_failures worker failures) or ClusterInterrupted
        (Ctrl-C / SIGTERM in the main thread: the run was stopped through Ray Train's abort)."""
        cfg = self.cluster
        preflight_storage(self.storage)
        started, ray_note = connect_ray(cfg.ray_address)
        embedded = started and cfg.ray_address is None and "RAY_ADDRESS" not in os.environ
        try:
            return self._fit(resume, started, embedded, ray_note)
        finally:
            if started:
                ray.shutdown()  # the embedded Ray ends with its run; a joined cluster is only left

    def _fit(self, resume: bool, started: bool, embedded: bool, ray_note: str) -> dict[str, Any]:
        cfg = self.cluster
        resources = ray.cluster_resources()
        use_gpu = resolve_use_gpu(self.run, cfg, resources)
        check_resources(dataclasses.replace(cfg, use_gpu=use_gpu), resources)
        if self.progress:
            print(f"[cluster] {ray_note}", flush=True)
        if not resume:
            from moe_runtime.cluster.ckpt import set_aside_run
            moved = set_aside_run(self.run_uri)
            if moved is not None:
                n = sum(1 for m in moved[1] if m.startswith("step_"))
                print(f"[cluster] --no-resume: moved the previous run's {n} checkpoint(s) and "
                      f"{', '.join(m for m in moved[1] if not m.startswith('step_')) or 'nothing else'} to "
                      f"{moved[0]} (kept; delete it when no longer needed)", flush=True)
        board = ray.remote(_board_cls()).options(num_cpus=0).remote(cfg.workers)
        if self.progress:
            print(f"[cluster] {cfg.workers} {'GPU' if use_gpu else 'CPU'} workers, ep={cfg.ep} "
                  f"({self.run.model.moe.num_experts // cfg.ep} experts per worker, {cfg.workers // cfg.ep} "
                  f"replica(s)); {self.storage_note}; run dir {self.run_uri}", flush=True)
        from moe_runtime.cluster.phases import GroupPhases
        with train_env(cfg, embedded):
            trainer = _trainer_cls(embedded)(
                _rank_main(), train_loop_config=self._spec(use_gpu, resume, board),
                scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, placement_strategy="PACK",
                                             resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}),
                torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(max(1, cfg.collective_timeout_s))),
                run_config=RayRunConfig(
                    name=self.run.name, storage_path=self.storage, callbacks=[GroupPhases(board, embedded)],
                    logging_config=LoggingConfig(log_level="WARNING"),  # Ray Train's warnings and errors only
                    failure_config=FailureConfig(max_failures=cfg.max_failures, controller_failure_limit=cfg.max_failures),
                    # pruning is ours (RayStore.publish -> prune_run): Ray's sees only this invocation's checkpoints
                    checkpoint_config=CheckpointConfig(num_to_keep=None)))
            error = self._run_watched(trainer, board)
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

    def _run_watched(self, trainer, board) -> Exception | None:
        """trainer.fit() in a thread (so Ray Train installs no SIGINT handler of its own), while this
        thread keeps the setup deadlines (Watchdog) and turns Ctrl-C / SIGTERM into an abort of the
        run through its controller and one line (ClusterInterrupted)."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["result"] = trainer.fit()
            except BaseException as e:  # noqa: BLE001 - Ray Train's TrainingFailedError and friends: rephrased
                box["error"] = e

        runner = threading.Thread(target=target, name="ray-train-fit", daemon=True)
        watchdog = Watchdog(board, self.cluster, self.progress)
        with _signals_raise() as received:
            runner.start()
            try:
                while runner.is_alive():
                    runner.join(1.0)
                    if runner.is_alive():
                        watchdog.check()
            except KeyboardInterrupt:
                signum = received[-1] if received else signal.SIGINT
                raise self._interrupt(board, runner, signum) from None
        error = box.get("error")
        return error if error is not None else getattr(box.get("result"), "error", None)

    def _interrupt(self, board, runner: threading.Thread, signum: int) -> ClusterInterrupted:
        """Stop every rank before another checkpoint, abort the run through its controller, and say
        where it stopped and what a rerun resumes from."""
        with _signals_ignored():
            state: dict[str, Any] = {}
            try:
                board.stop.remote()
                state = ray.get(board.state.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - the board is gone: the line says less
                pass
            try:
                controller = ray.get(board.controller.remote(), timeout=10)
                if controller is not None:
                    ray.get(controller.abort.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the run is being torn down; Ray's shutdown ends the rest
                pass
            runner.join(20)
            step = state.get("last_step", -1)
            where = f"at step {step}" if step >= 0 else "before the first step"
            from moe_runtime.cluster.ckpt import RayStore
            try:
                last = RayStore(self.run_uri).newest()
            except Exception:  # noqa: BLE001 - storage unreachable: say so rather than fail here
                last = None
            resume = (f"rerun the same command (same --storage and --name) to resume from {last}" if last else
                      "no checkpoint was written yet, so a rerun starts from step 0")
            name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
            return ClusterInterrupted(signum, f"moe train: interrupted ({name}) {where}; {resume}")

    def _spec(self, use_gpu: bool, resume: bool, board) -> dict[str, Any]:
        """What a worker needs, as plain values (and the board's actor handle); never tensors."""
        run = self.run.to_dict()
        run["train"]["device"] = "cuda" if use_gpu else "cpu"
        c = self.cluster
        return {"run": run, "ep": c.ep, "data": self.data, "run_uri": self.run_uri, "offload": c.offload_experts,
                "overlap": c.overlap_grad_sync == "on" or (c.overlap_grad_sync == "auto" and use_gpu),
                "progress": self.progress, "plots": self.plots and "://" not in self.run_uri, "resume": resume,
                "threads": max(1, int(c.cpus_per_worker)), "board": board, "hf": self.hf, "invocation": uuid.uuid4().hex,
                "collective_timeout_s": c.collective_timeout_s, "fault": c.fault.to_dict() if c.fault else None,
                "driver": {"pid": os.getpid(), "start": _process_start_time(os.getpid()),
                           "node": ray.get_runtime_context().get_node_id()}}


class Watchdog:
    """Deadlines on the phases of a (re)starting worker group that Ray Train puts none on: worker
    start (the actors' get_metadata) and process-group init (TorchConfig's rendezvous, whose
    timeout reaches only the ranks that are not stuck). When a phase outlasts --start-timeout, one
    line names the worker (rank, or pid before ranks exist) and the phase; the stuck worker is then
    killed so that Ray Train's retry policy (max_failures) applies: a new group, or the run ends
    with that line. Setup, the first collective, steps and checkpoints are bounded by
    --collective-timeout (gloo's timeout, Ray Train's report barrier) and named by the RunBoard."""

    PHASES = ("worker start", "process-group init")

    def __init__(self, board, cfg: ClusterConfig, progress: bool):
        self.board, self.cfg, self.progress = board, cfg, progress
        self.handled: dict[tuple[int, str], int] = {}  # (group start, phase) -> deadlines missed so far

    def check(self) -> str | None:
        try:
            st = ray.get(self.board.state.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - the board is busy or gone: the next check sees
            return None
        phase, since, workers = st["group"]
        key = (st["group_starts"], phase)
        missed = self.handled.get(key, 0)
        if phase not in self.PHASES or st["now"] - since < (missed + 1) * self.cfg.start_timeout_s:
            return None
        self.handled[key] = missed + 1
        msg, kill = self._stuck(phase, workers, st["now"] - since)
        if kill and not missed:
            msg += f"; killed it, Ray Train retries (--max-failures {self.cfg.max_failures})"
        else:  # nothing here to kill, or the kill did not unblock the group: end the run with this line
            msg += "; ending the run"
        self.board.report_hang.remote(msg)
        print(f"[cluster] {msg}", file=sys.stderr, flush=True)
        if kill and not missed:
            for k in kill:
                k()
            return msg
        try:
            controller = ray.get(self.board.controller.remote(), timeout=10)
            if controller is not None:
                controller.abort.remote()
        except Exception:  # noqa: BLE001 - the controller is gone: the run is ending anyway
            pass
        return msg

    def _stuck(self, phase: str, workers: list[dict[str, Any]], waited: float) -> tuple[str, list]:
        from moe_runtime.cluster.board import process_state
        here = ray.get_runtime_context().get_node_id()
        limit = f"no progress for {waited:.0f}s (--start-timeout {self.cfg.start_timeout_s:g})"
        pending: list[dict[str, Any]] = []
        if phase == "worker start":  # no ranks yet: Ray's actor table names the worker processes
            from ray._private import state as ray_state
            job = ray.get_runtime_context().get_job_id()
            # every worker actor of this job with a process, created or still being created (a worker
            # stopped inside its constructor never becomes ALIVE)
            actors = [a for a in ray_state.actors().values()
                      if a["ActorClassName"] == "RayTrainWorker" and a["State"] != "DEAD" and a.get("Pid")
                      and a["JobID"] == job]
            workers = [{"rank": None, "pid": a["Pid"], "node": (a.get("Address") or {}).get("NodeID"), "actor": None}
                       for a in actors]
            pending = [w for w, a in zip(workers, actors) if a["State"] != "ALIVE"]
        local = [w for w in workers if w["node"] == here and w["pid"]]
        stopped = [w for w in local if process_state(w["pid"]) in ("T", "t")]
        named = stopped or pending or workers  # the stopped ones; else those not yet created; else all
        what = {"worker start": "Ray Train's worker start (get_metadata)",
                "process-group init": "process-group init (TorchConfig rendezvous)"}[phase]
        who = ", ".join(f"rank {w['rank']} (pid {w['pid']})" if w["rank"] is not None else
                        f"a worker with no rank yet (pid {w['pid']})" for w in named) or "no worker process found"
        state = ("is stopped (SIGSTOP)" if len(stopped) == 1 else "are stopped (SIGSTOP)") if stopped else \
            "did not get through"
        msg = f"{who} {state} in {what}: {limit}"
        kill = []
        for w in named:
            if w.get("actor") is not None:
                kill.append(lambda a=w["actor"]: ray.kill(a, no_restart=True))
            elif w in local:
                kill.append(lambda pid=w["pid"]: _kill_pid(pid))
        return msg, kill


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _process_start_time(pid: int) -> int | None:
    from moe_runtime.cluster.board import process_start_time
    return process_start_time(pid)


@contextlib.contextmanager
def _signals_raise() -> Iterator[list[int]]:
    """In the main thread: SIGINT and SIGTERM raise KeyboardInterrupt (the list records which);
    the previous handlers (Ray's own included) are restored afterwards."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While the run is torn down after Ctrl-C / SIGTERM: a second signal does not cut it short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
                        start_timeout_s=getattr(args, "start_timeout", 120.0),
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
