"""AllToAllDispatcher == LocalDispatcher on the same global batch: outputs and every gradient.

Four plain gloo processes (no Ray); groups of 2 and 4 ranks are formed inside them. Each process
computes the single-process reference itself (same seeds), so nothing but pass/fail crosses
process boundaries.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from moe_runtime.cluster.dispatch import AllToAllDispatcher
from moe_runtime.cluster.groups import build_groups, spawn_gloo
from moe_runtime.core.dispatch import LocalDispatcher
from moe_runtime.core.experts import ExpertBank

E, D, F = 8, 16, 8
# (name, tokens per rank for world 4 (first 2 used for world 2), top_k, routing)
CASES = [
    ("random_k2", [5, 0, 7, 3], 2, "random"),
    ("top_k_1", [4, 6, 1, 2], 1, "random"),
    ("top_k_is_E", [3, 2, 2, 1], E, "random"),
    ("rank1_receives_nothing", [6, 5, 4, 3], 2, "avoid_rank1"),
    ("all_to_rank0", [6, 5, 4, 3], 2, "rank0_only"),
]


def _routing(T: int, K: int, mode: str, world: int, g: torch.Generator) -> torch.Tensor:
    scores = torch.rand(T, E, generator=g)
    El = E // world
    if mode == "avoid_rank1":
        scores[:, El:2 * El] = -1.0  # experts of EP rank 1 are never chosen
    elif mode == "rank0_only":
        scores[:, El:] = -1.0  # only EP rank 0's experts are chosen
    return scores.topk(K, dim=-1).indices


def _close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got - want).abs()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), \
        f"{name}: max err {err.max():.3g} mean err {err.mean():.3g}"


def _run_case(groups, case) -> None:
    name, per_rank, K, mode = case
    lay = groups.layout
    sizes = per_rank[:lay.world]
    T = sum(sizes)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    torch.manual_seed(0)
    bank = ExpertBank(E, D, F, init_std=0.3)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    idx = _routing(T, K, mode, lay.ep, g)
    w = torch.rand(T, K, generator=g, requires_grad=True)
    up = torch.randn(T, D, generator=g)
    # single-process reference on the global batch
    ld = LocalDispatcher(E)
    xs, counts, meta = ld.dispatch(x, idx, w)
    y_ref = ld.combine(bank(xs, counts), meta)
    (y_ref * up).sum().backward()
    # this rank: its token rows, its experts
    lo, hi = sum(sizes[:lay.rank]), sum(sizes[:lay.rank + 1])
    rows = lay.expert_rows
    local = ExpertBank(lay.experts_per_rank, D, F, expert_offset=rows.start)
    with torch.no_grad():
        local.w13_EDF2.copy_(bank.w13_EDF2[rows])
        local.w2_EFD.copy_(bank.w2_EFD[rows])
    xr = x.detach()[lo:hi].clone().requires_grad_()
    wr = w.detach()[lo:hi].clone().requires_grad_()
    ad = AllToAllDispatcher(E, groups.ep)
    xs_r, counts_r, meta_r = ad.dispatch(xr, idx[lo:hi], wr)
    assert torch.equal(counts_r, counts[rows]), f"{name}: local counts {counts_r} != {counts[rows]}"
    if mode == "avoid_rank1" and lay.ep_rank == 1 or mode == "rank0_only" and lay.ep_rank != 0:
        assert xs_r.shape[0] == 0, f"{name}: rank {lay.rank} should receive no rows"
    y = ad.combine(local(xs_r, counts_r), meta_r)
    (y * up[lo:hi]).sum().backward()
    _close(f"{name} y", y, y_ref[lo:hi])
    _close(f"{name} dx", xr.grad, x.grad[lo:hi])
    _close(f"{name} dw_topk", wr.grad, w.grad[lo:hi])
    _close(f"{name} dw13", local.w13_EDF2.grad, bank.w13_EDF2.grad[rows])
    _close(f"{name} dw2", local.w2_EFD.grad, bank.w2_EFD.grad[rows])


def _worker(rank: int, world: int) -> None:
    for w in (2, 4):
        groups = build_groups(w, E, ranks=list(range(w)))
        if groups is None:
            continue
        for case in CASES:
            _run_case(groups, case)
        if w == 4:
            with pytest.raises(ValueError, match="num_experts=6 is not divisible by the expert-parallel group size 4"):
                AllToAllDispatcher(6, groups.ep)


def test_alltoall_matches_local_dispatcher():
    """Forward and all gradients, world 2 and 4, incl. a rank that sends no tokens, a rank that
    receives none, every token on one rank's experts, top_k = 1 and top_k = E."""
    spawn_gloo(_worker, 4, timeout_s=60)
