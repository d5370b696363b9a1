"""Expert-parallel token dispatch with all-to-all, and the global-batch count reduction.

Legend: T tokens on this rank, K top-k, N = T*K routed copies sent by this rank, R rows received
by this rank, D model dim, E experts (global), EP expert-parallel ranks, El = E / EP local experts,
L MoE layers.

AllToAllDispatcher has LocalDispatcher's contract (core/dispatch.py):
    dispatch(x_TD, topk_idx_TK, topk_w_TK) -> (x_sorted_RD, counts_El, meta)
    combine(y_sorted_RD, meta) -> y_TD
1. sort this rank's copies by global expert (so they are grouped by owning rank),
2. exchange per-expert counts (all-to-all of E ints), 3. exchange the rows (all-to-all with explicit
split sizes), 4. regroup the received rows by local expert; MoELayer then runs its ExpertBank of
El experts; 5. combine: undo 4, reverse all-to-all, weighted scatter-add by the top-k weights.
The row exchange is an autograd.Function whose backward is the reverse all-to-all, so gradients
reach the sending rank's tokens and router. Ranks that send or receive no rows take part in every
collective with empty buffers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moe_runtime import kernels
from moe_runtime.core.experts import compute_dtype
from moe_runtime.core.model import is_recomputing
from moe_runtime.core.router import CountReducer


@dataclass
class CommTimer:
    """Seconds spent inside collectives, by kind. With CUDA tensors it synchronises around each
    collective when `sync_cuda` (benchmarks only: it serialises communication with compute)."""

    sync_cuda: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: {"alltoall": 0.0, "allreduce": 0.0})

    def reset(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {"alltoall": 0.0, "allreduce": 0.0}
        return out

    def run(self, kind: str, fn, t: torch.Tensor):
        if self.sync_cuda and t.is_cuda:
            torch.cuda.synchronize(t.device)  # host sync: timing only
        t0 = time.perf_counter()
        out = fn()
        if self.sync_cuda and t.is_cuda:
            torch.cuda.synchronize(t.device)  # host sync: timing only
        self.seconds[kind] += time.perf_counter() - t0
        return out


def _group_size(group) -> int:
    return dist.get_world_size(group)


def all_to_all_rows(x_ND: torch.Tensor, send: list[int], recv: list[int], group, timer: CommTimer | None
                    ) -> torch.Tensor:
    """Send rows send[0:1], send[1:2] ... of x to ranks 0, 1 ...; receive recv[i] rows from rank i."""
    if _group_size(group) == 1:
        return x_ND.clone()
    out = x_ND.new_empty((sum(recv),) + tuple(x_ND.shape[1:]))

    def go():
        # collective: all-to-all of token rows with explicit (possibly zero) split sizes.
        dist.all_to_all_single(out, x_ND.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                               group=group)
        return out
    return timer.run("alltoall", go, x_ND) if timer is not None else go()


class _AllToAllRows(torch.autograd.Function):
    """Differentiable row exchange: backward sends each row's gradient back to where it came from."""

    @staticmethod
    def forward(ctx, x_ND, send, recv, group, timer):
        ctx.send, ctx.recv, ctx.group, ctx.timer = send, recv, group, timer
        return all_to_all_rows(x_ND, send, recv, group, timer)

    @staticmethod
    def backward(ctx, g_RD):
        # collective: the reverse all-to-all (every rank's autograd reaches it in the same layer order).
        return all_to_all_rows(g_RD, ctx.recv, ctx.send, ctx.group, ctx.timer), None, None, None, None


@dataclass
class AllToAllMeta:
    token_idx_N: torch.Tensor
    """[N] source token of each sent row (rows ordered by global expert)."""
    weight_N: torch.Tensor
    """[N] combine weight of each sent row (carries the router gradient)."""
    num_tokens: int
    send: list[int]
    """Rows sent to each EP rank."""
    recv: list[int]
    """Rows received from each EP rank."""
    unsort_R: torch.Tensor
    """[R] position in the expert-sorted buffer of each received row (undoes step 4)."""
    dropped: int = 0


class AllToAllDispatcher:
    """Expert-parallel dispatcher over one EP group: this rank computes experts
    [ep_rank * El, (ep_rank + 1) * El) for every rank of the group. Dropless."""

    def __init__(self, num_experts: int, group, timer: CommTimer | None = None):
        self.group, self.timer = group, timer
        self.ep = _group_size(group)
        if num_experts % self.ep:
            raise ValueError(f"num_experts={num_experts} is not divisible by the expert-parallel group size "
                             f"{self.ep}; choose a multiple of {self.ep} or change --ep")
        self.num_experts, self.local_experts = num_experts, num_experts // self.ep
        self.last_drop_rate = 0.0
        self.rows_received = 0
        """Rows this rank's experts received since the caller last reset it (load reporting)."""

    def dispatch(self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_w_TK: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, AllToAllMeta]:
        T, K = topk_idx_TK.shape
        El, ep = self.local_experts, self.ep
        order_N, counts_E = kernels.sort_by_expert(topk_idx_TK, self.num_experts)
        token_idx_N = order_N // K
        weight_N = topk_w_TK.reshape(-1).index_select(0, order_N)
        # Rows travel in the experts' compute dtype (bf16 under autocast: half the bytes of fp32).
        x_perm_ND = kernels.permute(x_TD.to(compute_dtype(x_TD)), token_idx_N)
        recv_counts_PEl = self._exchange_counts(counts_E).view(ep, El)
        splits = torch.stack([counts_E.view(ep, El).sum(1), recv_counts_PEl.sum(1)])
        send, recv = splits.tolist()  # host sync: all_to_all_single needs split sizes as Python ints
        x_recv_RD = _AllToAllRows.apply(x_perm_ND, send, recv, self.group, self.timer)
        # Received rows are grouped by source rank, then expert; regroup them by local expert.
        expert_R = torch.repeat_interleave(torch.arange(El, device=counts_E.device).repeat(ep),
                                           recv_counts_PEl.reshape(-1))
        sort_R = torch.argsort(expert_R, stable=True)
        unsort_R = torch.empty_like(sort_R)
        unsort_R[sort_R] = torch.arange(sort_R.numel(), device=sort_R.device)
        x_sorted_RD = x_recv_RD.index_select(0, sort_R)
        counts_El = recv_counts_PEl.sum(0)
        if not is_recomputing():  # activation checkpointing replays this dispatch in backward
            self.rows_received += sum(recv)
        return x_sorted_RD, counts_El, AllToAllMeta(token_idx_N, weight_N, T, send, recv, unsort_R)

    def _exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """[EP * El]: for each source rank, how many rows it sends to each of my local experts."""
        if self.ep == 1:
            return counts_E
        out = torch.empty_like(counts_E)

        def go():
            # collective: all-to-all of per-expert counts (El ints to each rank), before the payload.
            dist.all_to_all_single(out, counts_E.contiguous(), group=self.group)
            return out
        return self.timer.run("alltoall", go, counts_E) if self.timer is not None else go()

    def combine(self, y_sorted_RD: torch.Tensor, meta: AllToAllMeta) -> torch.Tensor:
        y_recv_RD = y_sorted_RD.index_select(0, meta.unsort_R)
        y_perm_ND = _AllToAllRows.apply(y_recv_RD, meta.recv, meta.send, self.group, self.timer)
        return kernels.unpermute(y_perm_ND, meta.token_idx_N, meta.weight_N, meta.num_tokens)


def count_reducer(group, timer: CommTimer | None = None) -> CountReducer:
    """BalanceTracker's `reduce`: sums [L, E] expert counts over every rank of the job.

    Summing counts (not averaging f) keeps f_i = global count / global assignments, so each rank's
    loss N_E * sum_i f_i * p_i(local) averaged by data-parallel gradient averaging is exactly the
    global-batch loss at any world size: no 1/world shrink (Megatron-LM issue 3672).
    """
    def reduce(counts_LE: torch.Tensor) -> torch.Tensor:
        out = counts_LE.clone()
        if _group_size(group) == 1:
            return out

        def go():
            # collective: ONE all-reduce of the [L, E] counts of every MoE layer.
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
            return out
        return timer.run("allreduce", go, out) if timer is not None else go()
    return reduce
