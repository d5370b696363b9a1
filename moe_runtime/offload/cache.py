"""Device expert cache: a fixed pool of expert slots and the (layer, expert) -> slot table.

Legend: S slots, D model dim, F expert hidden dim. A key is (MoE layer index, expert id).

The pool is ONE device buffer allocated at construction (no allocation per step). The table is
pure host bookkeeping and knows nothing about copies: a slot is assigned to a key first, then the
copy engine fills it; the generation counter of a slot changes on every assignment so a handle
taken before an eviction can never read the new occupant (`check_handle`).

There is one eviction system: the Planner (offload/decision.py) chooses every victim with the rules
in offload/eviction.py, for the engine and the simulator alike. This table only records what it
decided (assign / evict / pin); the policy name it carries says which scheme the Planner runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_runtime.offload.plan import SCHEMES
from moe_runtime.offload.store import ExpertLayout, alloc_buffer, quant_views, split_views

Key = tuple[int, int]
POLICIES = ("lru", "lfu", "predictive", "mixtral-offloading", "moe-infinity", "fiddler", "llama-cpp-n-cpu-moe",
            "ktransformers", "hybrid", "hybrid-lru")
"""Policies the engine runs online (offload/decision.py defines what each decides); the simulator
adds the offline ones (belady, belady-prefetch) that need the future."""


class SlotPool:
    """S device expert slots in one buffer: w13_SDF2 [S, D, 2F] and w2_SFD [S, F, D] views, or for a
    quantised layout a uint8 buffer sized by quantised bytes with `quant` (a QuantExperts bank of S)."""

    def __init__(self, num_slots: int, layout: ExpertLayout, device: torch.device | str):
        if num_slots < 1:
            raise ValueError(f"gpu_expert_slots={num_slots} must be >= 1; one slot is the least that makes "
                             f"progress (experts then pass through it one at a time)")
        self.num_slots, self.layout, self.device = num_slots, layout, torch.device(device)
        self.buffer = alloc_buffer(num_slots, layout, self.device)
        self.quant = quant_views(self.buffer, num_slots, layout) if layout.quant is not None else None
        if self.quant is None:
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


@dataclass(frozen=True)
class SlotHandle:
    """A key's slot as of one assignment; stale once the slot is reassigned."""

    key: Key
    slot: int
    generation: int


class StaleSlotError(RuntimeError):
    """A slot was about to be read for an expert that no longer occupies it."""


class ExpertCache:
    """(layer, expert) -> slot table over a fixed number of slots. `policy` names the scheme whose
    Planner decides its victims (offload/decision.py); the table itself decides nothing."""

    def __init__(self, num_slots: int, policy: str):
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        if policy not in SCHEMES:  # every scheme a Planner runs, the simulator's offline bounds included
            raise ValueError(f"policy={policy!r} is not one of {', '.join(POLICIES)}; pick one of those")
        self.num_slots = num_slots
        self.policy = policy
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

    def pin(self, slot: int) -> None:
        self.pins[slot] += 1

    def unpin(self, slot: int) -> None:
        assert self.pins[slot] > 0, f"slot {slot} unpinned more often than pinned"
        self.pins[slot] -= 1

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
        return old

    def evict(self, key: Key) -> None:
        slot = self.slot_of.pop(key)
        assert self.pins[slot] == 0, f"evicting pinned slot {slot}"
        self.owner[slot] = None
        self.generation[slot] += 1
        self.evictions += 1

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


__all__ = ["SlotPool", "ExpertCache", "SlotHandle", "StaleSlotError", "POLICIES", "Key"]
