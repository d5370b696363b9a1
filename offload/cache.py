"""Device expert cache: a fixed pool of expert slots, a (layer, expert) -> slot table, policies.

Legend: S slots, D model dim, F expert hidden dim. A key is (MoE layer index, expert id).

The pool is ONE device buffer allocated at construction (no allocation per step). The table is
pure host bookkeeping and knows nothing about copies: a slot is assigned to a key first, then the
copy engine fills it; the generation counter of a slot changes on every assignment so a handle
taken before an eviction can never read the new occupant (`check_handle`).

The engine's victims are chosen by the Planner (offload/decision.py, rules in offload/eviction.py).
The policies here keep per-key recency / frequency for direct users of `choose_slot`:
- LRU: least recently used.
- LFU: fewest uses over the whole run (ties: least recently used).
- predictive: LRU, but never evicts an expert in `protected` (key -> deadline layer) unless the
  caller must make progress, and then the one needed last.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from offload.store import ExpertLayout, split_views

Key = tuple[int, int]
POLICIES = ("lru", "lfu", "predictive", "mixtral-offloading", "moe-infinity")
"""Policies the engine runs online (offload/decision.py defines what each decides); the simulator
adds the offline ones (belady, belady-prefetch) that need the future."""


class SlotPool:
    """S device expert slots in one buffer: w13_SDF2 [S, D, 2F] and w2_SFD [S, F, D] views."""

    def __init__(self, num_slots: int, layout: ExpertLayout, device: torch.device | str):
        if num_slots < 1:
            raise ValueError(f"gpu_expert_slots={num_slots} must be >= 1; one slot is the least that makes "
                             f"progress (experts then pass through it one at a time)")
        self.num_slots, self.layout, self.device = num_slots, layout, torch.device(device)
        self.buffer = torch.empty(num_slots * layout.expert_numel, dtype=layout.dtype, device=self.device)
        self.w13_SDF2, self.w2_SFD = split_views(self.buffer, num_slots, layout)

    @staticmethod
    def slots_for_gib(gib: float, layout: ExpertLayout) -> int:
        """How many whole expert slots fit in `gib` GiB of device memory."""
        slots = math.floor(gib * 2**30 / layout.expert_bytes)
        if slots < 1:
            raise ValueError(f"gpu_expert_gib={gib} holds no expert of {layout.expert_bytes / 2**20:.1f} MiB; "
                             f"give at least {layout.expert_bytes / 2**30:.4f} GiB")
        return slots

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


class Policy:
    """Victim choice; sees every access, insert and eviction."""

    name = "base"

    def __init__(self) -> None:
        self.clock = 0
        self.last_use: dict[Key, int] = {}

    def on_access(self, key: Key) -> None:
        self.clock += 1
        self.last_use[key] = self.clock

    def on_insert(self, key: Key) -> None:
        self.on_access(key)

    def on_evict(self, key: Key) -> None:
        self.last_use.pop(key, None)

    def victim(self, candidates: list[Key], protected: Mapping[Key, int]) -> Key | None:
        return min(candidates, key=lambda k: self.last_use.get(k, 0))


class LRUPolicy(Policy):
    name = "lru"


class LFUPolicy(Policy):
    """Use counts persist across evictions (at most L*E keys), so a hot expert comes back hot."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self.freq: dict[Key, int] = {}

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        self.freq[key] = self.freq.get(key, 0) + 1

    def on_insert(self, key: Key) -> None:
        # Inserting is not a use: a prefetched or streamed expert earns its count when it runs.
        self.clock += 1
        self.last_use[key] = self.clock

    def victim(self, candidates: list[Key], protected: Mapping[Key, int]) -> Key | None:
        return min(candidates, key=lambda k: (self.freq.get(k, 0), self.last_use.get(k, 0)))


class PredictivePolicy(Policy):
    name = "predictive"

    def victim(self, candidates: list[Key], protected: Mapping[Key, int]) -> Key | None:
        free = [k for k in candidates if k not in protected]
        if free:
            return super().victim(free, protected)
        return None


def make_policy(name: str) -> Policy:
    """The bookkeeping policy of a named scheme: LFU counts uses; every other scheme tracks recency
    here and decides its victims in offload/decision.py (the name says which scheme)."""
    table = {"lfu": LFUPolicy, "predictive": PredictivePolicy}
    if name not in POLICIES + ("belady", "belady-prefetch", "this-token-lru", "this-token-lfu"):
        raise ValueError(f"policy={name!r} is not one of {', '.join(POLICIES)}; pick one of those")
    policy = table.get(name, LRUPolicy)()
    policy.name = name
    return policy


@dataclass(frozen=True)
class SlotHandle:
    """A key's slot as of one assignment; stale once the slot is reassigned."""

    key: Key
    slot: int
    generation: int


class StaleSlotError(RuntimeError):
    """A slot was about to be read for an expert that no longer occupies it."""


class ExpertCache:
    """(layer, expert) -> slot table over a fixed number of slots, with a replacement policy."""

    def __init__(self, num_slots: int, policy: str | Policy):
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.num_slots = num_slots
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.owner: list[Key | None] = [None] * num_slots
        self.generation = [0] * num_slots
        self.pins = [0] * num_slots
        self.slot_of: dict[Key, int] = {}
        self.evictions = 0

    def __contains__(self, key: Key) -> bool:
        return key in self.slot_of

    def __len__(self) -> int:
        return len(self.slot_of)

    def lookup(self, key: Key) -> int | None:
        return self.slot_of.get(key)

    def handle(self, key: Key) -> SlotHandle:
        slot = self.slot_of[key]
        return SlotHandle(key, slot, self.generation[slot])

    def check_handle(self, h: SlotHandle) -> int:
        """The slot to read for h; raises if the slot was reassigned since h was taken."""
        if self.owner[h.slot] != h.key or self.generation[h.slot] != h.generation:
            raise StaleSlotError(f"slot {h.slot} was reassigned from {h.key} (generation {h.generation}) to "
                                 f"{self.owner[h.slot]} (generation {self.generation[h.slot]}); reading it would "
                                 f"use the wrong expert's weights")
        return h.slot

    def access(self, key: Key) -> None:
        self.policy.on_access(key)

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1

    def unpin(self, slot: int) -> None:
        assert self.pins[slot] > 0, f"slot {slot} unpinned more often than pinned"
        self.pins[slot] -= 1

    def choose_slot(self, protected: Mapping[Key, int] | None = None, *, force: bool = True) -> int | None:
        """A free slot, else the policy's victim among unpinned slots (not evicted yet).

        force=False (prefetch): None rather than evict a protected expert. force=True (a demand
        miss must make progress): if the policy declines, the protected expert needed last goes.
        None when every slot is pinned.
        """
        protected = protected or {}
        for s in range(self.num_slots):
            if self.owner[s] is None and self.pins[s] == 0:
                return s
        cands = [k for s, k in enumerate(self.owner) if k is not None and self.pins[s] == 0]
        if not cands:
            return None
        key = self.policy.victim(cands, protected)
        if key is None and force:
            key = max(cands, key=lambda k: (protected.get(k, -1), -self.policy.last_use.get(k, 0)))
        return None if key is None else self.slot_of[key]

    def assign(self, key: Key, slot: int) -> Key | None:
        """Give `slot` to `key`, evicting its occupant; returns the evicted key (or None)."""
        assert key not in self.slot_of, f"{key} already holds slot {self.slot_of[key]}"
        assert self.pins[slot] == 0, f"slot {slot} is pinned and cannot be reassigned"
        old = self.owner[slot]
        if old is not None:
            self.evict(old)
        self.owner[slot] = key
        self.slot_of[key] = slot
        self.generation[slot] += 1
        self.policy.on_insert(key)
        return old

    def evict(self, key: Key) -> None:
        slot = self.slot_of.pop(key)
        assert self.pins[slot] == 0, f"evicting pinned slot {slot}"
        self.owner[slot] = None
        self.generation[slot] += 1
        self.evictions += 1
        self.policy.on_evict(key)

    def check_invariants(self) -> None:
        """No slot held by two keys, table and owners agree, pins non-negative."""
        seen: dict[Key, int] = {}
        for s, k in enumerate(self.owner):
            if k is not None:
                assert k not in seen, f"{k} occupies slots {seen[k]} and {s}"
                seen[k] = s
            assert self.pins[s] >= 0
        assert seen == self.slot_of, f"table {self.slot_of} disagrees with owners {seen}"
        assert len(self.slot_of) <= self.num_slots


__all__ = ["SlotPool", "ExpertCache", "SlotHandle", "StaleSlotError", "Policy", "LRUPolicy", "LFUPolicy",
           "PredictivePolicy", "make_policy", "POLICIES", "Key"]
