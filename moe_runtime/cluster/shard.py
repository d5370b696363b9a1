"""Expert sharding of a model, and gradient synchronisation / clipping for the W x EP layout.

Legend: W ranks in the job, EP expert-parallel size, E experts, El = E / EP local experts.

Gradient arithmetic. Rank r's loss is the mean over ITS tokens; the global loss is the mean of
the W rank losses (equal token counts), so:
- a dense parameter's gradient is the average of the W rank gradients (all-reduce over the job);
- an expert's gradient on its owner already sums, through the reverse all-to-all, the gradients of
  every rank of its EP group; summing over the R = W/EP replicas (all-reduce over the replica
  group) adds the other groups, and dividing by W gives the gradient of the global loss.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moe_runtime.cluster.dispatch import CommTimer
from moe_runtime.cluster.groups import ParallelGroups
from moe_runtime.cluster.offload import HostExpertBank
from moe_runtime.core.experts import ExpertBank

BUCKET_BYTES = 32 * 1024 * 1024


def expert_param_names(model: nn.Module) -> set[str]:
    """Names of the parameters that are row shards of [E, ...] expert tensors."""
    names = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, (ExpertBank, HostExpertBank)):  # the offloaded bank holds the same tensors
            names.update(f"{mname}.{p}" for p, _ in mod.named_parameters(recurse=False))
    return names


def split_params(model: nn.Module, expert_names: set[str]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, expert) trainable parameters; a missing gradient becomes zeros, because in one
    process every expert row has a (possibly zero) gradient and still takes its AdamW step."""
    dense, experts = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (experts if name in expert_names else dense).append(p)
    return dense, experts


def sync_gradients(dense: list[nn.Parameter], experts: list[nn.Parameter], groups: ParallelGroups,
                   timer: CommTimer | None = None) -> None:
    """Dense: average over the job. Experts: sum over replicas, divide by W (module docstring)."""
    W = groups.layout.world
    _allreduce_mean([p.grad for p in dense], groups.world, W, timer)
    sync_expert_gradients(experts, groups, timer)


def sync_expert_gradients(experts: list[nn.Parameter], groups: ParallelGroups, timer: CommTimer | None = None) -> None:
    """Experts: sum over the replica group, divide by W (module docstring)."""
    _allreduce_mean([p.grad for p in experts], groups.replica, groups.layout.world, timer)


def _allreduce_mean(grads: list[torch.Tensor], group, divisor: int, timer: CommTimer | None) -> None:
    """Sum grads over `group` in flat buckets (few large collectives), then divide by `divisor`."""
    size = dist.get_world_size(group)
    for bucket in _buckets(grads):
        flat = _flatten_dense_tensors(bucket)
        if size > 1:
            # Offloaded expert grads live on the host; NCCL reduces device buffers only.
            via_gpu = flat.device.type == "cpu" and dist.get_backend(group) == "nccl"
            buf = flat.cuda() if via_gpu else flat

            def go(buf=buf):
                # collective: all-reduce of one flat gradient bucket.
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
            timer.run("allreduce", go, buf) if timer is not None else go()
            if via_gpu:
                flat.copy_(buf)
        flat.div_(divisor)
        for g, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(synced)


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive grads of one device and dtype, up to BUCKET_BYTES each."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if (not out or size + nbytes > BUCKET_BYTES or out[-1][0].device != g.device
                or out[-1][0].dtype != g.dtype):
            out.append([])
            size = 0
        out[-1].append(g)
        size += nbytes
    return out


def clip_grad_norm(dense: list[nn.Parameter], experts: list[nn.Parameter], max_norm: float,
                   groups: ParallelGroups, timer: CommTimer | None = None) -> float:
    """torch.nn.utils.clip_grad_norm_ over the whole (unsharded) model; returns the total norm.

    Dense gradients are identical on every rank after sync; expert gradients are split over the
    EP group, so their squared norms are summed over it (the replicas hold the same values).
    """
    params = dense + experts
    if not params:
        return 0.0
    dev = params[0].grad.device
    dense_sq = _sq_norm(dense, dev)
    expert_sq = _sq_norm(experts, dev)
    if dist.get_world_size(groups.ep) > 1:
        def go():
            # collective: sum of this EP group's squared expert-gradient norms.
            dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=groups.ep)
        timer.run("allreduce", go, expert_sq) if timer is not None else go()
    total = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.device))
    return float(total)  # host sync: the norm is a logged metric


def _sq_norm(params: list[nn.Parameter], dev: torch.device) -> torch.Tensor:
    acc = torch.zeros((), dtype=torch.float32, device=dev)
    for p in params:
        acc = acc + torch.linalg.vector_norm(p.grad.float(), 2).to(dev).square()
    return acc


class DenseGradOverlap:
    """DDP-style overlap: during the step's last backward, each bucket of dense gradients is
    all-reduced (async) as soon as autograd has produced all of its gradients, while backward goes
    on computing the rest. finish() waits, then writes the averages back into .grad.

    Buckets follow reverse parameter order (roughly the order backward produces gradients) and the
    hooks fire in the same order on every rank (same graph), so every rank issues the same
    collectives in the same order. Earlier micro-batches of an accumulation step only accumulate.
    """

    def __init__(self, dense: list[nn.Parameter], group, world: int, timer: CommTimer | None = None,
                 bucket_bytes: int = BUCKET_BYTES):
        self.group, self.world, self.timer = group, world, timer
        self.buckets: list[list[nn.Parameter]] = []
        size = 0
        for p in reversed(dense):
            nbytes = p.numel() * p.element_size()
            if not self.buckets or size + nbytes > bucket_bytes or self.buckets[-1][0].device != p.device:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.armed = False
        self.left: list[int] = []
        self.inflight: list[tuple[int, torch.Tensor, object]] = []
        for p in dense:
            p.register_post_accumulate_grad_hook(self._ready)

    def arm(self) -> None:
        """Call before the step's last backward."""
        self.armed, self.left, self.inflight = True, [len(b) for b in self.buckets], []

    def _ready(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        i = self.bucket_of[id(p)]
        self.left[i] -= 1
        if self.left[i] == 0:
            self._launch(i)

    def _launch(self, i: int) -> None:
        flat = _flatten_dense_tensors([p.grad for p in self.buckets[i]])
        # collective (async): all-reduce of one dense-gradient bucket, overlapping the rest of backward.
        handle = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True) \
            if dist.get_world_size(self.group) > 1 else None
        self.inflight.append((i, flat, handle))

    def finish(self) -> None:
        """Wait for every bucket (launching any whose gradients never arrived, as zeros), average."""
        t0 = time.perf_counter()
        for i, n in enumerate(self.left):
            if n > 0:
                for p in self.buckets[i]:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                self._launch(i)
        for i, flat, handle in self.inflight:
            if handle is not None:
                handle.wait()
            flat.div_(self.world)
            for p, synced in zip(self.buckets[i], _unflatten_dense_tensors(flat, [p.grad for p in self.buckets[i]])):
                p.grad.copy_(synced)
        if self.timer is not None:
            self.timer.seconds["allreduce"] += time.perf_counter() - t0  # only the part not hidden by backward
        self.armed, self.inflight = False, []
