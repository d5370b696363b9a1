"""An upper bound on the tokens/s of ANY planner under the Planner's cost model (issue 19).

Legend: L MoE layers, S slots, u a use (one expert of one layer step, routed n_u tokens), j a layer
step (pass p, layer m: position p L + m), A the attention time of all steps, h(n) / d(n) the host /
device run time of an expert at n tokens, C the copy time of one expert.

The cost model (offload/decision.py): a step j takes attention, then its experts run: on the device
(resident, or after a copy over the link, a FIFO that may run ahead of compute) or on host cores,
or split between them. Whatever a planner does, with T its modelled time:
  T >= A + H   (host work of a step runs after its attention and before the next step's)
  T >= A + D   (the device runs attention and every device-run expert one after another)
  T >= X       (the link carries every copy; X its busy time)
so T >= l1 (A + H) + l2 (A + D) + l3 X for any l1 + l2 + l3 = 1, l >= 0. That sum splits per use:
a use served from a slot it stayed in since its key's previous use (a kept interval) costs at least
min(l1 h, l2 d); any other use at least min(l1 h, l2 d + l3 C) (a copy, a host run, or a split,
which costs a convex mix of the two). Keeping intervals is limited only by S: at each step
boundary at most S keys stay in slots. Relaxations, each in the planner's favour: the link may
run arbitrarily far ahead and a prefetched expert needs no slot until it is used; a key may stay
in a slot after a host run without a copy; the first use of each key may be served from a free
warm set of S keys; host and device work of a step overlap; splits cost nothing extra (split_s);
no copy is ever wasted. The most total weight of kept intervals is a maximum-weight S-colourable
subgraph of an interval graph: exact for equal weights by the sweep that drops the interval ending
latest (Belady with bypass), bounded for unequal ones (batches) by summing that count over the
weights' level sets. Maximising over a grid of (l1, l2, l3) gives the bound; every step of the
argument only lowers T, so tokens / T is an upper bound on what the cost model lets any planner,
with perfect knowledge of the routing, reach.
"""
from __future__ import annotations

import heapq
from typing import Any

import numpy as np

from moe_runtime.offload.cpu_experts import Calibration, CostModel

INF = float("inf")


def _uses(steps, L: int) -> tuple[list[tuple[int, tuple[int, int], int]], int]:
    """[(position, key, tokens)] in position order, and the number of layer steps."""
    out = []
    for p, st in enumerate(steps):
        for m in range(L):
            for e, n in sorted(st.used[m].items()):
                out.append((p * L + m, (m, e), int(n)))
    return out, len(steps) * L


def max_kept(uses: list[tuple[int, tuple[int, int], int]], qualifies: np.ndarray, S: int) -> int:
    """Most intervals (a key from one use to its next, or from the start to its first use) whose
    end use qualifies that can be kept with at most S at any step boundary: the left-to-right sweep
    that, over capacity, drops the kept interval ending latest (optimal for equal weights)."""
    nxt = [INF] * len(uses)
    last: dict = {}
    first: dict = {}
    for i in range(len(uses) - 1, -1, -1):
        pos, key, _ = uses[i]
        j = last.get(key)
        nxt[i] = j if j is not None and qualifies[j] else None
        last[key] = i
        first[key] = i
    # the warm set: the S keys whose first use (if it qualifies) comes first
    heap: list[tuple[int, tuple[int, int]]] = []  # (-end index, key): the latest end on top
    held: dict = {}
    for key, i in sorted(first.items(), key=lambda kv: kv[1]):
        if qualifies[i] and len(held) < S:
            held[key] = i
            heapq.heappush(heap, (-i, key))
    kept, i, n = 0, 0, len(uses)
    while i < n:
        pos = uses[i][0]
        j = i
        while j < n and uses[j][0] == pos:
            key = uses[j][1]
            if held.get(key) == j:
                kept += 1
            held.pop(key, None)
            if nxt[j] is not None:
                held[key] = nxt[j]
                heapq.heappush(heap, (-nxt[j], key))
            j += 1
        while len(held) > S:
            end, key = heapq.heappop(heap)
            if held.get(key) == -end:
                del held[key]
        i = j
    return kept


def upper_bound(steps, L: int, capacity: int, cal: Calibration, *, grid: int = 40) -> dict[str, Any]:
    """The bound on `steps` (the replayed passes) with `capacity` slots: decode seconds T_min (a lower
    bound on any planner's modelled time of these passes), tokens, the maximising weights and the
    Belady-with-bypass hit count (equal weights)."""
    cost = CostModel(cal)
    uses, n_steps = _uses(steps, L)
    A = n_steps * cal.attn_s
    C = cal.copy_s
    ns = np.array([u[2] for u in uses])
    vals = np.unique(ns)
    cnt = np.array([(ns == v).sum() for v in vals])
    h = np.array([cost.host_time(int(v)) for v in vals])
    d = np.array([cost.device_time(int(v)) for v in vals])
    memo: dict[frozenset, int] = {}

    def kept(sel: frozenset) -> int:
        if sel not in memo:
            memo[sel] = max_kept(uses, np.isin(ns, list(sel)), capacity)
        return memo[sel]

    best = (-INF, None)
    for a in range(grid + 1):
        for b in range(grid + 1 - a):
            l1, l2 = a / grid, b / grid
            l3 = 1.0 - l1 - l2
            hit = np.minimum(l1 * h, l2 * d)
            w = np.minimum(l1 * h, l2 * d + l3 * C) - hit
            T = (l1 + l2) * A + float((cnt * (hit + w)).sum())
            prev = 0.0
            for level in np.unique(w[w > 0]):
                T -= (level - prev) * kept(frozenset(vals[w >= level].tolist()))
                prev = level
            if T > best[0]:
                best = (T, (l1, l2, l3))
    tokens = sum(st.B for st in steps)
    return {"time_s": best[0], "tokens": tokens, "weights": best[1], "uses": len(uses),
            "belady_bypass_hits": kept(frozenset(vals.tolist())), "attn_s": A}


__all__ = ["upper_bound", "max_kept"]
