"""What the Planner (offload/decision.py) decides with and what it hands out: the schemes (one
per policy), the ops of a layer's plan in execution order, and the tally of what it did.

Legend: a key is (MoE layer index, expert id).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

Key = tuple[int, int]


@dataclass(frozen=True, kw_only=True)
class Scheme:
    """How a policy decides: its eviction rule and its prefetch rule."""

    name: str
    evict: str
    """lru | lfu | next-use | belady | this-token-lru | this-token-lfu | layer-lru | frequency."""
    prefetch: str
    """none | cost (the cost model decides) | always (every predicted expert, no cost check)."""
    recency_candidates: bool = False
    """Also consider the experts a layer used last pass as prefetch candidates."""
    frequency_candidates: bool = False
    """Also consider the next layer's most frequently activated experts (MoE-Infinity)."""
    adaptive: bool = False
    """Evict by whichever of lru / lfu / next-use its shadow cache says missed least lately."""
    distances: tuple[int, ...] | None = None
    """Prediction distances the scheme listens to (None: all)."""
    pin: str = "none"
    """none | hot (the most frequently used experts of a calibration profile hold slots for good) |
    layers (llama.cpp --n-cpu-moe: every expert of as many whole layers as fit, the last layers)."""
    cold: str = "planner"
    """How a miss is served: planner (the cost model: copy, host, split, wait) | host (always on host
    cores, never copied: KTransformers, llama.cpp) | fiddler (each miss alone: host cores unless a copy
    plus the device run is faster, Fiddler's rule) | parallel (each miss on whichever of host cores or
    link finishes it first, given the work already queued on both)."""
    staging: float = 0.0
    """Share of the slots left out of the pinned set (at least one slot when a scheme copies): copied
    cold experts land there, replaced LRU."""

    @property
    def peer(self) -> bool:
        """A host-using peer scheme (serves misses by its own published rule, not the cost model)."""
        return self.cold != "planner"

    @property
    def needs_future(self) -> bool:
        """Offline rules: only the simulator, which has the whole trace, can run them."""
        return self.evict in ("belady", "this-token-lru", "this-token-lfu")


SCHEMES = {s.name: s for s in (
    Scheme(name="lru", evict="lru", prefetch="none"),
    Scheme(name="lfu", evict="lfu", prefetch="none"),
    Scheme(name="predictive", evict="next-use", prefetch="cost", adaptive=True,
           recency_candidates=True),
    Scheme(name="belady", evict="belady", prefetch="none"),
    Scheme(name="belady-prefetch", evict="belady", prefetch="cost"),
    Scheme(name="this-token-lru", evict="this-token-lru", prefetch="none"),
    Scheme(name="this-token-lfu", evict="this-token-lfu", prefetch="none"),
    Scheme(name="mixtral-offloading", evict="layer-lru", prefetch="always", distances=(1,)),
    Scheme(name="moe-infinity", evict="frequency", prefetch="always", frequency_candidates=True),
    # host-using peers (offload/decision.py's docstring says what each does and where it is published)
    Scheme(name="fiddler", evict="lru", prefetch="none", pin="hot", cold="fiddler", staging=0.125),
    Scheme(name="llama-cpp-n-cpu-moe", evict="lru", prefetch="none", pin="layers", cold="host"),
    Scheme(name="ktransformers", evict="lru", prefetch="none", pin="hot", cold="host"),
    Scheme(name="hybrid", evict="lru", prefetch="none", pin="hot", cold="parallel", staging=0.125),
    Scheme(name="hybrid-lru", evict="lru", prefetch="none", pin="hot", cold="parallel", staging=0.5),
)}
PEERS = ("fiddler", "llama-cpp-n-cpu-moe", "ktransformers", "hybrid", "hybrid-lru")
"""The host-using peers, as published (offload/decision.py)."""


@dataclass(frozen=True)
class Op:
    """One step of a layer's plan, in execution order: copy `key` into `slot` (evicting `evicted`),
    run `key` from its slot (waiting for its copy), or run `key` on host cores; and a split run:
    `copy` with host_share r > 0 moves all but the first r of W13's rows (the gate/up weights,
    [D, 2F]) and all of W2, `split` runs x[:, :rD] W13[:rD] on host cores from the store while that
    copy flies and the rest on the device (the partial sums meet before the activation), and
    `fill` then copies the first r of W13's rows, so the slot ends holding the whole expert."""

    kind: str
    """copy | run | cpu | split | fill."""
    key: Key
    slot: int = -1
    evicted: Key | None = None
    host_share: float = 0.0
    """Fraction of W13's rows left to host cores (copy / split / fill of a split run; 0 otherwise)."""


@dataclass
class LayerPlan:
    ops: list[Op] = field(default_factory=list)
    stream: bool = False


@dataclass
class Tally:
    """What the decisions did (the engine's counters are these)."""

    expert_uses: int = 0
    hits: int = 0
    late_hits: int = 0
    misses: int = 0
    cpu_served: int = 0
    split_runs: int = 0
    """Misses run split: host cores on part of the expert while the link copies the rest."""
    demand_copies: int = 0
    stream_copies: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    prefetch_cancelled: int = 0
    background_copies: int = 0
    cache_steps: int = 0
    stream_steps: int = 0

    def minus(self, other: "Tally") -> "Tally":
        return Tally(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, int | float | None]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["hit_rate"] = self.hits / self.expert_uses if self.expert_uses else None
        return d


__all__ = ["Scheme", "SCHEMES", "PEERS", "Op", "LayerPlan", "Tally"]
