"""rank_main: what each Ray Train worker runs (core.train.Trainer's loop with an EPPlan).

Failure classes, decided here where the error happens:
- configuration and storage errors (ValueError, FileNotFoundError, StorageError): left on the
  RunBoard and the worker returns normally, so Ray Train does NOT restart the group; the driver
  raises them as one line;
- a collective that timed out (TorchConfig.timeout_s): the rank reports it, waits a moment for its
  peers to report theirs, names the rank(s) that did not (they stopped moving) and raises, so Ray
  Train restarts the group from the newest checkpoint;
- anything else (a peer that died, a bug) propagates to Ray Train as is.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from moe_runtime.cluster.board import process_start_time, stalled_ranks
from moe_runtime.cluster.ckpt import RayStore, StorageError
from moe_runtime.cluster.groups import build_groups
from moe_runtime.cluster.layout import FaultPlan
from moe_runtime.cluster.plan import EPPlan
from moe_runtime.core.config import RunConfig
from moe_runtime.core.data import load_corpus
from moe_runtime.core.modelio import filesystem, is_uri
from moe_runtime.core.train import Trainer

TIMEOUT_GRACE_S = 2.0
FATAL = (ValueError, FileNotFoundError, StorageError)


class WorkerHang(RuntimeError):
    """A peer stopped responding; the message names it."""


def rank_main(config: dict[str, Any]) -> None:
    _quiet_ray_train()
    rank = ray.train.get_context().get_world_rank()
    board = config["board"]
    attempt = ray.get(board.start.remote(rank, os.getpid(), ray.get_runtime_context().get_node_id()))
    if rank == 0:
        board.clear_timeouts.remote()
    driver = DriverWatch(config.get("driver") or {}, board, rank)

    def beat(phase: str, step: int) -> None:
        driver.check(phase, step)  # a rank whose driver is gone stops here, before the step or checkpoint
        board.beat.remote(rank, phase, step)  # fire and forget: no round trip on the training path

    beat("setup", 0)
    try:
        summary = _train(config, rank, beat, resume=config["resume"] or attempt > 0)  # a restart always resumes
    except FATAL as e:
        ray.get(board.report_fatal.remote(str(e).splitlines()[0] if str(e) else type(e).__name__))
        _abort_group()  # peers blocked in a collective with me fail now instead of at the timeout
        return
    except RuntimeError as e:
        if ray.get(board.state.remote())["fatal"]:
            return  # a peer hit an error that no retry fixes, and aborted: the driver reports it
        if not _is_collective_timeout(e):
            raise
        state = _after_timeout(board, rank)
        msg = stalled_ranks(state, ray.train.get_context().get_world_size()) or str(e).splitlines()[0]
        msg += f" after {config['collective_timeout_s']:g}s (--collective-timeout)"
        board.report_hang.remote(msg)
        raise WorkerHang(msg) from None
    beat("done", summary["step"])
    ray.get(board.report_rank.remote(rank, summary.pop("memory")))  # recorded before the driver reads the board
    if rank == 0:
        ray.get(board.finish.remote(summary))


def _train(config: dict[str, Any], rank: int, beat, resume: bool) -> dict[str, Any]:
    run = RunConfig.from_dict(config["run"], source="cluster spec")
    torch.set_num_threads(run.train.threads if run.train.threads > 0 else config["threads"])
    groups = build_groups(config["ep"], run.model.moe.num_experts)
    corpus = load_corpus(config["data"], vocab_size=run.model.vocab_size)
    run_uri = config["run_uri"]
    local_dir = Path(run_uri) if not is_uri(run_uri) else Path(tempfile.mkdtemp(prefix="moe-run-"))
    sink = MetricsFile(run_uri) if rank == 0 else None
    plan = EPPlan(groups, RayStore(run_uri, keep=run.train.keep_checkpoints), offload=config["offload"], overlap_grad_sync=config["overlap"], fault=FaultPlan.from_dict(config["fault"]),
                  heartbeat=beat, metrics_sink=sink.append if sink else None, invocation=config.get("invocation"),
                  only_own_checkpoints=not config["resume"])
    trainer = Trainer(run, corpus=corpus, out_dir=local_dir, progress=False, plots=config["plots"], plan=plan)
    if config.get("hf"):  # fine-tuning: in place (the optimizer holds these parameters); a resume overwrites it
        from moe_runtime.core.hf import load_hf_weights, read_hf
        load_hf_weights(read_hf(config["hf"]), trainer.model, expert_rows=groups.layout.expert_rows)
    peak_after_init = _peak_rss_bytes()  # model + optimizer built: the full model must never have existed here
    if rank == 0 and config["progress"]:
        print(f"[cluster rank 0] data: {corpus.source}", flush=True)
    s = trainer.fit(resume=resume)
    return {"step": s["step"], "tokens_seen": s["tokens_seen"], "final_loss": s["final_loss"],
            "last_eval": s["last_eval"], "history": s["history"], "run_dir": run_uri,
            "offload": plan.streamer.memory_report() | plan.streamer.stats if plan.streamer else None,
            "memory": {**memory_report(trainer), "peak_rss_after_init_bytes": peak_after_init}}


def _quiet_ray_train() -> None:
    """Ray Train logs each ray.train.report ('Reporting training result ...') at INFO through a
    logger named after its file, outside the 'ray.train' logger its LoggingConfig sets: warnings
    and errors only, like the rest of Ray Train in our runs."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class DriverWatch:
    """Whether the driver that started this run is still there. When it dies (SIGKILL, OOM), Ray
    tears its workers down only after a while; in that window a rank would go on training and
    publish another checkpoint into a run directory a rerun may already be using. So before every
    step (and, with a round trip to the driver-owned RunBoard, before every checkpoint) a rank
    checks, and stops at once if the driver is gone or is ending the run."""

    def __init__(self, driver: dict[str, Any], board, rank: int):
        self.pid, self.start, self.board, self.rank = driver.get("pid"), driver.get("start"), board, rank
        self.local = bool(self.pid) and driver.get("node") == ray.get_runtime_context().get_node_id()

    def check(self, phase: str, step: int) -> None:
        if self.local and process_start_time(self.pid) != self.start:
            self._stop(f"the driver (pid {self.pid}) is gone", phase, step)
        if phase == "checkpoint":
            try:
                going_on = ray.get(self.board.ping.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self._stop("the driver is gone (its RunBoard does not answer)", phase, step)
            if not going_on:
                self._stop("the driver is ending the run", phase, step)

    def _stop(self, why: str, phase: str, step: int) -> None:
        what = f"checkpoint of step {step}" if phase == "checkpoint" else f"step {step + 1}"
        print(f"[cluster rank {self.rank}] {why}: stopping before the {what}", flush=True)
        sys.stdout.flush()
        os._exit(1)  # no cleanup that could publish or wait on a collective: the run is over


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_report(trainer: Trainer) -> dict[str, int]:
    """This rank's peak RSS and the bytes of its parameters and AdamW state, dense vs experts."""
    names = trainer.plan.expert_names
    dense = sum(p.numel() * p.element_size() for n, p in trainer.model.named_parameters() if n not in names)
    experts = sum(p.numel() * p.element_size() for n, p in trainer.model.named_parameters() if n in names)
    opt = sum(t.numel() * t.element_size() for st in trainer.opt.state.values() for t in st.values()
              if torch.is_tensor(t))
    return {"peak_rss_bytes": _peak_rss_bytes(), "dense_param_bytes": dense,
            "expert_param_bytes": experts, "optimizer_bytes": opt}


def _abort_group() -> None:
    try:
        torch.distributed.destroy_process_group()
    except (RuntimeError, ValueError, AssertionError):
        pass  # already torn down


def _is_collective_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return "timed out" in text or "timeout" in text


def _after_timeout(board, rank: int) -> dict[str, Any]:
    """Report my timeout, give the other healthy ranks a moment to report theirs, read the board."""
    ray.get(board.report_timeout.remote(rank))
    time.sleep(TIMEOUT_GRACE_S)
    return ray.get(board.state.remote())


class MetricsFile:
    """Rank 0's metrics.jsonl in the run directory: appended on a local path, rewritten on a URI
    (object stores have no append; the file is small)."""

    def __init__(self, run_uri: str):
        self.run_uri, self.lines = run_uri, []

    def append(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec) + "\n"
        if not is_uri(self.run_uri):
            Path(self.run_uri).mkdir(parents=True, exist_ok=True)
            with open(Path(self.run_uri) / "metrics.jsonl", "a") as fh:
                fh.write(line)
            return
        self.lines.append(line)
        fs, root = filesystem(self.run_uri)
        with fs.open_output_stream(f"{root}/metrics.jsonl") as out:
            out.write("".join(self.lines).encode())
