"""Ray worker actors, the worker group, its placement group, and process-group setup.

Rendezvous: job rank 0 opens the TCPStore server on port 0, so the OS picks a free port and the
store keeps the socket it bound (no bind-close-reuse race); the driver reads back the (ip, port)
and hands it to every actor, which joins one torch.distributed group: NCCL for GPU workers, gloo
for CPU workers, with `collective_timeout_s` as the bound on the rendezvous and on every
collective. Weights and activations never pass through Ray: only small config dicts and metric
summaries do; the data path is torch.distributed.
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

try:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as e:  # pragma: no cover - exercised by tests/test_cli.py in a subprocess
    raise ImportError(f"cluster training needs Ray ({e}); install it with `pip install 'moe-runtime[ray]'`") from e

from cluster.layout import ClusterConfig

ROOT_CAUSE_GRACE_S = 3.0


def create_store(host: str, world: int, timeout_s: float) -> dist.TCPStore:
    """The rendezvous server, on a port the OS picked and the store still holds."""
    return dist.TCPStore(host, 0, world, is_master=True, timeout=timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_process_group(store_addr: tuple[str, int], rank: int, world: int, backend: str, timeout_s: float,
                       store: dist.TCPStore | None = None) -> None:
    """Join the job's process group; rank 0 passes the server store it created."""
    if store is None:
        store = dist.TCPStore(store_addr[0], store_addr[1], world, is_master=False,
                              timeout=timedelta(seconds=timeout_s))
    kw = {}
    if backend == "nccl":
        # Ray exposes only the worker's own GPU (CUDA_VISIBLE_DEVICES), so it is device 0 here.
        torch.cuda.set_device(0)
        kw["device_id"] = torch.device("cuda", 0)
    # collective: every rank blocks here until all W have joined (bounded by timeout_s).
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                            **kw)


class Worker:
    """One rank of the job. Made a Ray actor by WorkerGroup (ray.remote(Worker).options(...))."""

    def __init__(self, rank: int, world: int, threads: int):
        torch.set_num_threads(max(1, threads))
        self.rank, self.world = rank, world
        self.store: dist.TCPStore | None = None
        self.trainer = None

    def start_rendezvous(self, timeout_s: float) -> tuple[str, int]:
        host = ray.util.get_node_ip_address()
        self.store = create_store(host, self.world, timeout_s)
        return host, self.store.port

    def join(self, addr: tuple[str, int], backend: str, timeout_s: float) -> int:
        join_process_group(addr, self.rank, self.world, backend, timeout_s, self.store)
        return self.rank

    def setup(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Build this rank's RankTrainer from a small, plain spec (see ClusterTrainer._spec)."""
        from cluster.engine import RankTrainer
        from cluster.groups import build_groups
        from cluster.layout import FaultPlan
        from moe.config import RunConfig
        from moe.data import load_corpus

        run = RunConfig.from_dict(spec["run"], source="cluster spec")
        if run.train.threads > 0:
            torch.set_num_threads(run.train.threads)
        groups = build_groups(spec["ep"], run.model.moe.num_experts)
        corpus = load_corpus(spec["data"], vocab_size=run.model.vocab_size)
        self.trainer = RankTrainer(run, groups, corpus=corpus, out_dir=spec["out_dir"], offload=spec["offload"],
                                   progress=spec["progress"], plots=spec["plots"], timer_sync=spec["timer_sync"],
                                   fault=FaultPlan.from_dict(spec["fault"]), attempt=spec["attempt"])
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.trainer.device),
                "corpus": corpus.source if self.rank == 0 else None}

    def fit(self, resume: bool, until_step: int | None, run_id: str | None) -> dict[str, Any]:
        return self.trainer.fit(resume=resume, until_step=until_step, run_id=run_id)


class WorkerFailure(RuntimeError):
    """A worker died or a collective failed; the group must be torn down and recreated."""


class WorkerGroup:
    """W Worker actors in one placement group (bundle i hosts rank i), joined in one process group."""

    def __init__(self, cfg: ClusterConfig, pg, use_gpu: bool):
        self.cfg = cfg
        W, t = cfg.workers, cfg.collective_timeout_s
        threads = max(1, int(cfg.cpus_per_worker))
        remote = ray.remote(Worker)
        self.actors = [remote.options(num_cpus=cfg.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_restarts=0,
                                      scheduling_strategy=PlacementGroupSchedulingStrategy(
                                          placement_group=pg, placement_group_bundle_index=i)).remote(i, W, threads)
                       for i in range(W)]
        try:
            # Actor start-up (process spawn, imports) is not a collective: allow it extra time.
            addr = self.wait([self.actors[0].start_rendezvous.remote(t)], deadline_s=t + 120)[0]
            self.wait([a.join.remote(addr, "nccl" if use_gpu else "gloo", t) for a in self.actors], deadline_s=t + 120)
        except BaseException:
            self.kill()
            raise

    def call(self, method: str, *args: Any) -> list:
        return [getattr(a, method).remote(*args) for a in self.actors]

    def wait(self, refs: list, deadline_s: float | None = None) -> list:
        """Results of every ref, in order. Raises WorkerFailure (or the application error) as soon as
        any worker dies or fails: the others may be blocked in a collective with it."""
        pending, done, t_end = list(refs), {}, None if deadline_s is None else time.monotonic() + deadline_s
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=self.cfg.poll_s)
            for r in ready:
                try:
                    done[r] = ray.get(r)
                except Exception as e:  # noqa: BLE001 - classified below
                    raise self._root_cause(refs, {refs.index(r): e}, pending) from e
            if t_end is not None and time.monotonic() > t_end:
                raise WorkerFailure(f"workers did not answer within {deadline_s:.0f}s")
        return [done[r] for r in refs]

    @staticmethod
    def _root_cause(refs: list, errors: dict[int, Exception], pending: list) -> Exception:
        """A death makes its peers' collectives fail too ("connection closed"); give Ray a moment
        to report every failure so the error names the worker that died, not a peer."""
        if pending:
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=ROOT_CAUSE_GRACE_S)
            for r in ready:
                try:
                    ray.get(r)
                except Exception as e:  # noqa: BLE001 - classified below
                    errors[refs.index(r)] = e
        dead = sorted(i for i, e in errors.items() if isinstance(e, ray.exceptions.RayActorError))
        rank = dead[0] if dead else min(errors)
        return _classify(errors[rank], rank, others=sorted(set(errors) - {rank}))

    def kill(self) -> None:
        """Bounded teardown: ray.kill ends each process at once, even inside a blocked collective."""
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - an actor that is already gone needs no killing
                pass


def _classify(e: Exception, rank: int, others: list[int]) -> Exception:
    also = f" (then workers {others} failed with it)" if others else ""
    if isinstance(e, ray.exceptions.RayActorError):  # the process died (os._exit, OOM, node loss, ray.kill)
        return WorkerFailure(f"worker {rank} died: {type(e).__name__}{also}")
    cause = getattr(e, "cause", None)
    if isinstance(cause, (ValueError, TypeError, KeyError, AttributeError)):
        return cause  # configuration errors and bugs: retrying cannot help
    return WorkerFailure(f"worker {rank} failed: {type(cause or e).__name__}: {cause or e}{also}")


def create_placement_group(cfg: ClusterConfig, use_gpu: bool, timeout_s: float = 300.0):
    """One bundle per worker (a GPU and its CPUs, or CPUs), packed onto as few nodes as possible so
    the all-to-all stays inside a node where it can."""
    bundle = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    pg = placement_group([dict(bundle) for _ in range(cfg.workers)], strategy="PACK")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise WorkerFailure(f"could not reserve {cfg.workers} x {bundle} within {timeout_s:.0f}s: the Ray cluster "
                            f"is busy; free resources or lower --workers")
    return pg


__all__ = ["Worker", "WorkerGroup", "WorkerFailure", "create_store", "join_process_group",
           "create_placement_group", "remove_placement_group"]
