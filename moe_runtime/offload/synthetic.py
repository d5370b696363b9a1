"""Seeded synthetic routing traces: Zipf popularity, temporal locality, per-layer transitions.

Legend: L MoE layers, E experts, K top-k, B sequences decoded together.

Each token picks K distinct experts per layer, one pick at a time: with probability `locality`
the expert the previous token of its sequence had in that pick at this layer (temporal
locality), else with probability `transition` a fixed function of its pick at the layer before
(a per-layer random permutation: cross-layer correlation that a learned predictor can find),
else a draw from a Zipf(`zipf`) popularity over a per-layer random ranking of the experts.
A pick that repeats an expert already chosen is redrawn from the popularity. Every forward pass
is one decode token per sequence, so the whole trace projects as decode.
"""
from __future__ import annotations

import numpy as np

from moe_runtime.offload.trace import RoutingTrace


def synthetic_trace(*, num_layers: int, num_experts: int, top_k: int, tokens: int, batch: int = 1,
                    zipf: float = 1.0, locality: float = 0.0, transition: float = 0.0, seed: int = 0,
                    expert_bytes: int = 0) -> RoutingTrace:
    """`tokens` decode passes of `batch` sequences; see the module docstring for the model."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    if not (0 <= locality and 0 <= transition and locality + transition <= 1):
        raise ValueError(f"locality={locality} and transition={transition} must be >= 0 with a sum <= 1")
    if tokens < 1 or batch < 1:
        raise ValueError(f"tokens={tokens} and batch={batch} must be >= 1")
    rng = np.random.default_rng(seed)
    L, E, K = num_layers, num_experts, top_k
    pop = 1.0 / np.arange(1, E + 1) ** zipf
    pop /= pop.sum()
    rank = np.stack([rng.permutation(E) for _ in range(L)])  # rank[l, i]: the i-th most popular expert
    perm = np.stack([rng.permutation(E) for _ in range(L)])  # transition map into layer l
    prev = np.full((batch, L, K), -1)
    experts = np.empty((tokens, batch, L, K), dtype=np.int64)
    for t in range(tokens):
        for b in range(batch):
            for l in range(L):
                chosen: list[int] = []
                for k in range(K):
                    r = rng.random()
                    if r < locality and prev[b, l, k] >= 0:
                        e = int(prev[b, l, k])
                    elif r < locality + transition and l > 0:
                        e = int(perm[l, experts[t, b, l - 1, k]])
                    else:
                        e = int(rank[l, rng.choice(E, p=pop)])
                    while e in chosen:
                        e = int(rank[l, rng.choice(E, p=pop)])
                    chosen.append(e)
                experts[t, b, l] = chosen
        prev = experts[t]
    # records in the engine's order: step, then layer, then sequence
    rec = experts.transpose(0, 2, 1, 3).reshape(-1, K)
    step = np.repeat(np.arange(tokens), L * batch)
    layer = np.tile(np.repeat(np.arange(L), batch), tokens)
    seq = np.tile(np.arange(batch), tokens * L)
    pos = step.copy()
    meta = {"source": "synthetic", "zipf": zipf, "locality": locality, "transition": transition, "seed": seed,
            "batch": batch, "expert_bytes": expert_bytes}
    return RoutingTrace(L, E, K, step, seq, pos, layer, rec, np.full(rec.shape, 1.0 / K, dtype=np.float32), meta=meta)


__all__ = ["synthetic_trace"]
