"""Process groups of the W x EP layout, and a local launcher that needs no Ray.

A job is a list of global ranks of the default torch.distributed group (all of them in a Ray job;
a subset when tests run several layouts inside one set of processes). Three groups serve it:
    world    every rank of the job: dense-gradient all-reduce, count all-reduce, barriers
    ep       the EP consecutive ranks that exchange tokens (all-to-all)
    replica  the ranks that hold the same experts (one per EP group): expert-gradient all-reduce
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_runtime.cluster.layout import Layout


@dataclass
class ParallelGroups:
    layout: Layout
    ranks: list[int]
    """Global ranks of the job, in job-rank order."""
    world: Any
    ep: Any
    replica: Any

    @property
    def root(self) -> int:
        """Global rank of job rank 0 (broadcast source, checkpoint committer, output owner)."""
        return self.ranks[0]


def build_groups(ep: int, num_experts: int, ranks: list[int] | None = None) -> ParallelGroups | None:
    """Create the job's groups. Every process of the default group must call this with the same
    arguments, members or not (new_group is collective); non-members get None."""
    all_ranks = list(range(dist.get_world_size()))
    ranks = list(all_ranks if ranks is None else ranks)
    W, me = len(ranks), dist.get_rank()
    if W % ep:
        raise ValueError(f"a job of {W} ranks is not divisible by ep={ep}; change --ep or --workers")
    world = dist.group.WORLD if ranks == all_ranks else _new_group(ranks)
    ep_group = replica_group = None
    for lo in range(0, W, ep):
        g = world if ep == W else _new_group(ranks[lo:lo + ep])
        if me in ranks[lo:lo + ep]:
            ep_group = g
    for j in range(ep):
        members = ranks[j::ep]
        g = world if ep == 1 else _new_group(members)
        if me in members:
            replica_group = g
    if me not in ranks:
        return None
    return ParallelGroups(Layout(ranks.index(me), W, ep, num_experts), ranks, world, ep_group, replica_group)


def _new_group(ranks: list[int]):
    # collective: group creation runs on every rank of the default group, in the same order.
    return dist.new_group(ranks)


# Imported once by the fork server, so each launched process starts in milliseconds instead of
# paying ~5 s of imports (torch, and torch._dynamo which the optimizer constructor pulls in).
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "moe_runtime.cluster.plan"]


def spawn_gloo(fn: Callable[..., None], world: int, *args: Any, timeout_s: float = 120.0) -> None:
    """Run fn(rank, world, *args) in `world` local processes joined in one gloo group.

    For tests, benchmarks and debugging without Ray. The processes fork from a single-threaded
    fork server (never from the caller, whose thread pools are not fork-safe). fn must be
    importable (module level); an exception in any process is re-raised here with its traceback.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with tempfile.TemporaryDirectory(prefix="moe-gloo-") as d:
        mp.start_processes(_entry, args=(world, fn, os.path.join(d, "store"), timeout_s, args), nprocs=world,
                           join=True, start_method="forkserver")


def _entry(rank: int, world: int, fn, store_path: str, timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(1)
    # A FileStore in a fresh temp dir: no port to pick, so no bind race between tests.
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()
