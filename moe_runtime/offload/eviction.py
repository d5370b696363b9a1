"""Eviction rules over the slot table, vectorised: which occupied, unpinned slot gives way.

Legend: L MoE layers, E experts, S slots; a key is (layer, expert); `here` is the position
(pass * L + layer) of the next layer to run; P is the probability a key is used at its layer's
next run.

Rules (offload/decision.py picks one per policy):
- lru: least recently used; lfu: fewest uses over the run (counts survive eviction), then LRU
  (the same semantics as offload/cache.py's LRUPolicy / LFUPolicy);
- next-use (predictive): the largest expected distance to the next use, layers until the key's
  layer runs again + L x (1/P - 1): Belady's rule with calibrated probabilities, and aware of the
  layer cycle (a key of the layer just run is next needed a pass later);
- belady: the largest true distance to the next use (the simulator passes the future);
- this-token-lru / this-token-lfu (bounds, simulator only): Belady that sees only the rest of the
  current forward pass; keys not used again in it give way first, by LRU / LFU. What a perfect
  predictor of the current token's routing could know: the part of Belady's lead it cannot
  reach is knowledge of later tokens;
- layer-lru (mixtral-offloading): LRU inside equal per-layer budgets (AdapMoE-style sizing);
- frequency (MoE-Infinity): the lowest activation frequency, the farthest layer first.
Each call looks at every slot once with numpy, so a 1536-slot cache costs microseconds, not a
Python loop per slot.
"""
from __future__ import annotations

import numpy as np

Key = tuple[int, int]
NEVER = np.iinfo(np.int64).max // 4


class UsageStats:
    """Per key an EMA of "used at its layer's run" (lazy decay) and the last run's experts, plus a
    calibrated recency boost: how much likelier than its frequency a key used last run is to be
    used again (0 without temporal locality, near 1 with strong)."""

    def __init__(self, num_layers: int, num_experts: int, decay: float = 0.95):
        self.decay = decay
        self.runs = np.zeros(num_layers, dtype=np.int64)
        self.v = np.zeros((num_layers, num_experts))
        self.t = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.last_LE = np.zeros((num_layers, num_experts), dtype=bool)
        self.last: list[set[int]] = [set() for _ in range(num_layers)]
        self.boost_num = self.boost_den = 0.0
        self._p_LE: np.ndarray | None = None
        """p_use_LE() since the last change (it is asked for many times between two layers' runs)."""

    def prime(self, profile_LE: np.ndarray) -> None:
        """Start from a calibration profile (share of passes using each key) instead of zero."""
        self.v[:] = np.clip(profile_LE, 0.0, 1.0)
        self._p_LE = None

    def frequency_E(self, m: int) -> np.ndarray:
        return self.v[m] * self.decay ** (self.runs[m] - self.t[m])

    def frequency(self, key: Key) -> float:
        l, e = key
        return float(self.v[l, e] * self.decay ** (self.runs[l] - self.t[l, e]))

    def observe(self, m: int, used: list[int]) -> None:
        f = self.frequency_E(m)
        now = np.zeros(f.shape[0], dtype=bool)
        now[used] = True
        prev = self.last_LE[m]
        if prev.any():  # calibrate the boost before the frequencies move (decay 0.999: long memory)
            self.boost_num = 0.999 * self.boost_num + float((now[prev] - f[prev]).sum())
            self.boost_den = 0.999 * self.boost_den + float((1 - f[prev]).sum())
        self.runs[m] += 1
        self.v[m, used] = f[used] * self.decay + (1 - self.decay)
        self.t[m, used] = self.runs[m]
        self.last_LE[m] = now
        self.last[m] = set(used)
        self._p_LE = None

    @property
    def boost(self) -> float:
        return max(0.0, self.boost_num / self.boost_den) if self.boost_den > 0 else 0.0

    def p_use_LE(self) -> np.ndarray:
        """[L, E] P(used at the layer's next run); cached until the next observe (read-only)."""
        if self._p_LE is None:
            f = self.v * self.decay ** (self.runs[:, None] - self.t)
            self._p_LE = np.where(self.last_LE, f + (1 - f) * self.boost, f)
            self._p_LE.flags.writeable = False
        return self._p_LE

    def p_use(self, key: Key) -> float:
        f = self.frequency(key)
        return f + (1 - f) * self.boost if self.last_LE[key] else f


class SlotTable:
    """The occupancy, pins and use history of the slots as arrays, and the victim rules."""

    def __init__(self, num_slots: int, num_layers: int, num_experts: int, future: dict[Key, list[int]] | None):
        self.L, self.E = num_layers, num_experts
        self.layer_S = np.full(num_slots, -1, dtype=np.int64)
        self.expert_S = np.full(num_slots, -1, dtype=np.int64)
        self.pinned_S = np.zeros(num_slots, dtype=bool)
        self.clock = 0
        self.last_use_LE = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.uses_LE = np.zeros((num_layers, num_experts), dtype=np.int64)
        self.future = future
        self.hot_LE = np.zeros((num_layers, num_experts), dtype=bool)
        """Keys the `hot` rule keeps (a calibration profile's most used; empty: it is LRU)."""
        self.next_pos_LE = np.full((num_layers, num_experts), NEVER, dtype=np.int64)
        self._empty = num_slots
        """Slots never assigned (slots are only ever reassigned, never emptied)."""
        self._ptr: dict[Key, int] = {}
        if future is not None:
            for (l, e), uses in future.items():
                self.next_pos_LE[l, e] = uses[0]

    # bookkeeping: every insert and use the Planner makes
    def on_insert(self, slot: int, key: Key) -> None:
        if self.layer_S[slot] < 0:
            self._empty -= 1
        self.layer_S[slot], self.expert_S[slot] = key
        self.clock += 1
        self.last_use_LE[key] = self.clock

    def on_access(self, key: Key) -> None:
        self.clock += 1
        self.last_use_LE[key] = self.clock
        self.uses_LE[key] += 1

    def used(self, m: int, experts: list[int], here: int) -> None:
        """Layer m used `experts` at position `here` (cached or not): their next true use moves on."""
        if self.future is None:
            return
        for e in experts:
            uses, i = self.future.get((m, e), []), self._ptr.get((m, e), 0)
            while i < len(uses) and uses[i] <= here:
                i += 1
            self._ptr[(m, e)] = i
            self.next_pos_LE[m, e] = uses[i] if i < len(uses) else NEVER

    def free_slot(self) -> int | None:
        if not self._empty:
            return None
        free = np.flatnonzero((self.layer_S < 0) & ~self.pinned_S)
        return int(free[0]) if free.size else None

    def candidates(self) -> np.ndarray:
        return np.flatnonzero((self.layer_S >= 0) & ~self.pinned_S)

    def _lru(self, slots: np.ndarray) -> int:
        return int(slots[np.argmin(self.last_use_LE[self.layer_S[slots], self.expert_S[slots]])])

    def distance(self, slots: np.ndarray, here: int, p_LE: np.ndarray | None) -> np.ndarray:
        """Expected (next-use) or true (belady) layers until each slot's key is used again."""
        l, e = self.layer_S[slots], self.expert_S[slots]
        if self.future is not None:
            return (self.next_pos_LE[l, e] - here).astype(np.float64)
        p = p_LE[l, e]
        ahead = (l - here) % self.L
        with np.errstate(divide="ignore"):
            return np.where(p > 0, ahead + self.L * (1.0 / p - 1.0), np.inf)

    def victim(self, rule: str, incoming: Key, here: int, p_LE: np.ndarray | None,
               pass_end: int = NEVER, slots: np.ndarray | None = None) -> tuple[int, float] | None:
        """(slot, its distance) of the victim among `slots` (default: the unpinned occupied ones),
        or None. `pass_end`: the first position of the next forward pass (this-token rules)."""
        slots = self.candidates() if slots is None else slots
        if slots.size == 0:
            return None
        if rule in ("this-token-lru", "this-token-lfu"):
            l, e = self.layer_S[slots], self.expert_S[slots]
            unseen = slots[self.next_pos_LE[l, e] >= pass_end]
            if unseen.size:
                return self.victim(rule.removeprefix("this-token-"), incoming, here, p_LE, slots=unseen)[0], 0.0
            d = self.distance(slots, here, p_LE)
            return int(slots[np.argmax(d)]), float(d.max())
        if rule == "lru":
            return self._lru(slots), 0.0
        if rule == "lfu":  # fewest uses, then least recently used
            l, e = self.layer_S[slots], self.expert_S[slots]
            uses = self.uses_LE[l, e]
            tie = np.flatnonzero(uses == uses.min())
            return int(slots[tie[np.argmin(self.last_use_LE[l[tie], e[tie]])]]), 0.0
        if rule == "hot":  # LRU among the keys outside the profiled hot set, else among all
            cold = slots[~self.hot_LE[self.layer_S[slots], self.expert_S[slots]]]
            return self._lru(cold if cold.size else slots), 0.0
        if rule == "layer-lru":
            return self._layer_lru(slots, incoming), 0.0
        if rule == "frequency":
            l, e = self.layer_S[slots], self.expert_S[slots]
            return int(slots[np.lexsort((-((l - here) % self.L), p_LE[l, e]))[0]]), 0.0
        d = self.distance(slots, here, p_LE)
        l, e = self.layer_S[slots], self.expert_S[slots]
        tie = np.flatnonzero(d == d.max())  # farthest, then least recently used
        i = tie[np.argmin(self.last_use_LE[l[tie], e[tie]])]
        return int(slots[i]), float(d[i])

    def _layer_lru(self, slots: np.ndarray, incoming: Key) -> int:
        """Each layer owns slots // L; LRU inside the incoming key's layer when it is at its
        budget, else inside the layers over theirs, else over all."""
        budget = max(1, self.layer_S.shape[0] // self.L)
        held = np.bincount(self.layer_S[self.layer_S >= 0], minlength=self.L)
        mine = slots[self.layer_S[slots] == incoming[0]]
        if mine.size and held[incoming[0]] >= budget:
            return self._lru(mine)
        over = slots[held[self.layer_S[slots]] > budget]
        return self._lru(over if over.size else slots)


class _RecencyShadow:
    """A demand-only shadow cache evicting by LRU, or (hot) by LRU among the keys outside a hot set
    first: the same victims as SlotTable's lru / hot rules (recency = the order of the last insert or
    use), kept as insertion-ordered dicts so a miss costs O(1) instead of a pass over every slot."""

    def __init__(self, num_slots: int, hot_LE: np.ndarray | None = None):
        self.S = num_slots
        self.hot_LE = hot_LE
        self.cold: dict[Key, None] = {}
        """Keys outside the hot set (all keys without one), least recently used first."""
        self.hot: dict[Key, None] = {}

    def __contains__(self, key: Key) -> bool:
        return key in self.cold or key in self.hot

    def touch(self, key: Key) -> None:
        d = self.hot if self.hot_LE is not None and self.hot_LE[key] else self.cold
        d.pop(key, None)
        d[key] = None

    def admit(self, key: Key, pinned: set[Key]) -> bool:
        """Insert a missed key, evicting the least recently used unpinned key (cold ones first);
        False when every slot is pinned (the miss passes through)."""
        if len(self.cold) + len(self.hot) >= self.S:
            victim = next((k for k in self.cold if k not in pinned), None)
            if victim is None:
                victim = next((k for k in self.hot if k not in pinned), None)
            if victim is None:
                return False
            (self.cold if victim in self.cold else self.hot).pop(victim)
        self.touch(key)
        return True


class ShadowRules:
    """Demand-only shadow caches of the same size, one per candidate rule, fed the real routing:
    the rule whose shadow missed least lately (EMA) is the one to evict by. Choosing among
    lru / lfu / next-use online keeps the predictive policy near the best of them on each trace
    (ARC / ACME style adaptive replacement)."""

    RULES = ("next-use", "lru", "lfu", "hot")

    def __init__(self, num_slots: int, num_layers: int, num_experts: int, decay: float = 0.995,
                 hot_LE: np.ndarray | None = None):
        self.tables = {r: SlotTable(num_slots, num_layers, num_experts, None) for r in ("next-use", "lfu")}
        self.recency = {"lru": _RecencyShadow(num_slots), "hot": _RecencyShadow(num_slots)}
        if hot_LE is not None:
            self.set_hot(hot_LE)
        self.slot_of: dict[str, dict[Key, int]] = {r: {} for r in self.tables}
        self.misses = dict.fromkeys(self.RULES, 0.0)
        self.decay = decay

    def set_hot(self, hot_LE: np.ndarray) -> None:
        """The `hot` rule keeps these keys (before any use)."""
        self.recency["hot"].hot_LE = hot_LE

    def observe(self, m: int, used: list[int], here: int, p_LE: np.ndarray) -> None:
        """Layer m used `used`: every shadow serves it (hits first, then misses, pinned until done)."""
        keys = [(m, e) for e in used]
        for r in self.RULES:
            if r in self.recency:
                shadow = self.recency[r]
                missed = [k for k in keys if k not in shadow]
                for k in keys:
                    if k in shadow:
                        shadow.touch(k)
                pinned: set[Key] = set()
                for k in missed:
                    if shadow.admit(k, pinned):
                        pinned.add(k)
                self.misses[r] = self.decay * self.misses[r] + len(missed)
                continue
            table, where = self.tables[r], self.slot_of[r]
            missed = [k for k in keys if k not in where]
            for k in keys:
                if k in where:
                    table.on_access(k)
            for k in missed:
                slot = table.free_slot()
                if slot is None:
                    found = table.victim(r, k, here, p_LE)
                    if found is None:
                        continue  # every slot holds this layer's experts: pass through
                    slot = found[0]
                    del where[(int(table.layer_S[slot]), int(table.expert_S[slot]))]
                table.on_insert(slot, k)
                table.on_access(k)
                table.pinned_S[slot] = True
                where[k] = slot
            table.pinned_S[:] = False
            self.misses[r] = self.decay * self.misses[r] + len(missed)

    @property
    def best(self) -> str:
        return min(self.RULES, key=lambda r: (self.misses[r], self.RULES.index(r)))


__all__ = ["UsageStats", "SlotTable", "ShadowRules", "NEVER"]
