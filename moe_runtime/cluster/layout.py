"""Cluster configuration and the data x expert parallel layout.

Legend: W workers (ranks), EP expert-parallel size, R = W / EP expert replicas, E experts,
E_local = E / EP experts per rank.

Layout. Every rank is a data-parallel rank: it trains on its own rows of the global batch and
holds a replica of every dense parameter (gradients averaged over all W ranks). The experts of
every MoE layer are split over an expert-parallel group of EP consecutive ranks (rank r owns
experts [(r % EP) * E_local, (r % EP + 1) * E_local)); there are R = W / EP such groups, and the
ranks holding the same experts (one per group, `r % EP` equal) form an expert-replica group
over which expert gradients are summed. Tokens travel by all-to-all inside an EP group only.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from typing import Any

from moe_runtime.core.config import RunConfig

FAULT_POINTS = ("setup", "step", "before_manifest", "checkpoint_write")
FAULT_ACTIONS = ("kill", "hang", "disk_full")


@dataclass(frozen=True, kw_only=True)
class FaultPlan:
    """Chaos testing: make one worker fail once per job, to check that recovery works on your cluster."""

    rank: int
    """The worker that fails."""
    step: int
    """It fails when it has completed this many optimizer steps (0 for 'setup')."""
    point: str = "step"
    """'setup': before building its model; 'step': before starting the next step; 'checkpoint_write':
    while writing its shard of the checkpoint of `step`; 'before_manifest': after its shard is written."""
    action: str = "kill"
    """'kill': SIGKILL itself; 'hang': SIGSTOP itself; 'disk_full': fail the write with ENOSPC."""
    marker: str
    """A file created when the fault fires, so it fires once per job (not again after a restart)."""

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "step": self.step, "point": self.point, "action": self.action,
                "marker": self.marker}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "FaultPlan | None":
        return None if d is None else cls(**d)


@dataclass(kw_only=True)
class ClusterConfig:
    """How many Ray Train workers, how they split the experts, where checkpoints go, and failures."""

    workers: int
    """W: Ray Train workers (one placement-group bundle each), one rank of the torch.distributed group each."""
    ep: int | None = None
    """Expert-parallel size; None = the largest divisor of workers that divides num_experts."""
    cpus_per_worker: float = 1.0
    """CPU cores in each worker's bundle (fractions allowed); its torch threads = max(1, floor)."""
    use_gpu: bool | None = None
    """One GPU per worker (NCCL) or CPU workers (gloo); None = GPUs when the cluster has one per worker."""
    offload_experts: bool = False
    """Keep each worker's expert weights and optimizer state in host memory, streamed per layer."""
    overlap_grad_sync: str = "auto"
    """'on': all-reduce dense gradients in buckets during the last backward (DDP-style); 'off': after
    it; 'auto': on with GPUs, off on CPU workers (measured slower there: the cores that would hide the
    communication are the ones computing backward; bench/results/cluster_overlap.md)."""
    max_failures: int = 3
    """Worker failures survived (Ray Train FailureConfig): the group restarts from the newest checkpoint."""
    collective_timeout_s: float = 120.0
    """Bound on process-group setup and on every collective (TorchConfig.timeout_s): a hung or dead
    peer is detected within it and the error names the rank that stopped."""
    start_timeout_s: float = 120.0
    """Deadline on each phase of a (re)starting worker group that Ray Train bounds nowhere: worker
    start (actor creation, get_metadata) and process-group init. A worker stuck there is named
    (rank, or pid before ranks exist) and killed, and Ray Train's retry policy applies."""
    storage: str | None = None
    """Checkpoint storage (Ray Train storage_path): an absolute directory or a URI (s3://, gs://, ...)."""
    ray_address: str | None = None
    """Ray cluster to join; None = the current one (`ray job submit`, RAY_ADDRESS) or a local one."""
    fault: FaultPlan | None = None
    """Chaos testing only (see FaultPlan)."""


def default_ep(workers: int, num_experts: int) -> int:
    """The largest expert-parallel size that divides both the worker count and the expert count."""
    return gcd(workers, num_experts)


def validate_cluster(run: RunConfig, cfg: ClusterConfig) -> ClusterConfig:
    """Refuse impossible layouts before any actor starts; returns cfg with `ep` filled in."""
    E, W = run.model.moe.num_experts, cfg.workers
    if not isinstance(W, int) or W < 1:
        raise ValueError(f"workers={W!r} must be an integer >= 1; pass --workers N")
    ep = default_ep(W, E) if cfg.ep is None else cfg.ep
    if ep < 1:
        raise ValueError(f"ep={ep} must be >= 1; pass --ep with a divisor of --workers")
    if E % ep:
        raise ValueError(f"num_experts={E} is not divisible by expert_parallel={ep}; choose a multiple of "
                         f"{ep} or change --ep (valid --ep values here: {_common_divisors(E, W)})")
    if W % ep:
        raise ValueError(f"workers={W} is not divisible by expert_parallel={ep}; use a multiple of {ep} "
                         f"workers or change --ep (valid --ep values here: {_common_divisors(E, W)})")
    if run.model.moe.capacity_factor is not None:
        raise ValueError(f"capacity_factor={run.model.moe.capacity_factor} is a single-process comparison "
                         f"mode; set it to None (dropless) for cluster training")
    if run.train.seq_len > run.model.max_seq_len:
        raise ValueError(f"seq_len={run.train.seq_len} exceeds the model's max_seq_len={run.model.max_seq_len}; "
                         f"lower seq_len or raise max_seq_len")
    if cfg.cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker={cfg.cpus_per_worker} must be > 0")
    if cfg.max_failures < 0:
        raise ValueError(f"max_failures={cfg.max_failures} must be >= 0")
    if cfg.start_timeout_s <= 0:
        raise ValueError(f"start_timeout_s={cfg.start_timeout_s} must be > 0; pass --start-timeout in seconds")
    if cfg.collective_timeout_s <= 0:
        raise ValueError(f"collective_timeout_s={cfg.collective_timeout_s} must be > 0; pass --collective-timeout "
                         f"in seconds")
    if run.train.batch_size % W:
        raise ValueError(f"batch_size={run.train.batch_size} is the global batch and is not divisible by "
                         f"workers={W}; use a multiple of {W} (each worker trains on batch_size / workers rows)")
    if cfg.overlap_grad_sync not in ("auto", "on", "off"):
        raise ValueError(f"overlap_grad_sync={cfg.overlap_grad_sync!r} must be 'auto', 'on' or 'off'")
    f = cfg.fault
    if f is not None and not (0 <= f.rank < W and f.point in FAULT_POINTS and f.action in FAULT_ACTIONS):
        raise ValueError(f"fault={f} needs 0 <= rank < workers={W}, point in {FAULT_POINTS}, action in "
                         f"{FAULT_ACTIONS}")
    cfg.ep = ep
    return cfg


def check_resources(cfg: ClusterConfig, resources: dict[str, float]) -> None:
    """Refuse more workers than the Ray cluster can ever place (totals, not momentary availability)."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    need_cpu = cfg.workers * cfg.cpus_per_worker
    if cfg.use_gpu and gpus < cfg.workers:
        raise ValueError(f"workers={cfg.workers} need one GPU each but the Ray cluster has {gpus:g} GPU(s); "
                         f"lower --workers to {int(gpus)} or fewer, or train on CPU workers (--device cpu)")
    if cpus < need_cpu:
        raise ValueError(f"workers={cfg.workers} x cpus_per_worker={cfg.cpus_per_worker:g} need {need_cpu:g} CPUs "
                         f"but the Ray cluster has {cpus:g}; lower --workers or --cpus-per-worker, or add nodes")


def _common_divisors(a: int, b: int) -> list[int]:
    return [d for d in range(1, min(a, b) + 1) if a % d == 0 and b % d == 0]


@dataclass(frozen=True)
class Layout:
    """Where one rank sits in the W x EP grid (pure arithmetic, no process groups)."""

    rank: int
    world: int
    ep: int
    num_experts: int

    def __post_init__(self) -> None:
        assert 0 <= self.rank < self.world and self.world % self.ep == 0 and self.num_experts % self.ep == 0

    @property
    def replicas(self) -> int:
        return self.world // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def replica(self) -> int:
        return self.rank // self.ep

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep

    @property
    def expert_rows(self) -> slice:
        """This rank's rows of every [E, ...] expert tensor."""
        lo = self.ep_rank * self.experts_per_rank
        return slice(lo, lo + self.experts_per_rank)

    @property
    def writes_experts(self) -> bool:
        """The first replica's ranks own the expert shards of a checkpoint."""
        return self.replica == 0
