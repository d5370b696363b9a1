"""The cost model that decides every expert transfer; the engine and the simulator both run it.

Legend: L MoE layers, E experts, m the MoE layer about to run, key (layer, expert), P the
calibrated probability that a key is used at its layer's next run, n tokens routed to an expert.

Time is modelled, never read from a clock: a virtual timeline advances by the calibrated attention
time per layer, the calibrated expert time per run and the stall while a needed copy lands; the
link is a FIFO queue on which one copy takes copy_s. Every decision depends only on the routing,
the predictions and the calibration, so the engine (offload/runtime.py executes a LayerPlan) and
the simulator (offload/simulate.py replays a trace) make the same decisions: the same hits,
misses, copies and bytes, and the simulator's projected time is the engine's modelled time.

Per MoE layer:
1. `prefetch(m, predictions)`, before attention. Candidates: predicted experts of layers m..m+depth
   (P = the predictor's measured precision at that distance) and, for the predictive policy, the
   experts those layers used last pass. The best candidate is copied while the link is free by the
   end of attention and its expected saving beats its costs:
     P x min(copy, link idle time before the use)         (a right guess moves link work into idle time)
   - (1 - P) x (copy - that idle time)                    (a wrong one delays demand copies as long)
   - P(victim used again) x copy                          (the miss its eviction may cause)
   and never over a victim expected back sooner than it. Requests whose layer has run are cancelled.
2. `serve(m, counts)`, the MoE step: the layer's uses are recorded first, hits run first, then each
   miss is copied or run on host cores, whichever the calibrated cost model says finishes first
   (a copy waits behind the queued ones; a host run also frees the link for as long as it runs,
   worth the best prefetch the link could carry meanwhile); its slot comes from the eviction rule.
   While host cores run, the idle link takes the next layers' candidates by the same rule,
   queued behind the step's demand copies. With host cores, the step's first copied miss runs
   split: host cores take the first r of W13's rows from the host store while the link copies the
   rest of the expert, r chosen so both finish together (r W H = queue + (1 - r W) C), so the miss
   costs about C H / (C + H) instead of C; a fill then copies W13's first rows behind it, so the
   slot ends holding the whole expert and the link carries exactly one expert's bytes.
The host-using peers (Scheme.peer; the simulator and the engine run them on the same timeline):
- fiddler (Kamahori et al. 2024): the profile's most used experts hold the slots; each miss on its
  own runs on host cores unless copy + device run is faster (Fiddler's per-expert latency rule),
  the copy landing in a staging eighth of the slots;
- llama-cpp-n-cpu-moe (`--n-cpu-moe N`): the experts of the last S // E layers sit in slots, the
  first N = L - S // E layers' experts run on host cores; static, nothing copied;
- ktransformers: the profile's hot experts pinned, every other expert on host cores, no link traffic;
- hybrid / hybrid-lru: the same hot set; each cold expert on whichever of host cores and link
  finishes it first given the work queued on both, in parallel; copies land in an LRU region of an
  eighth / a half of the slots.
Hot sets come from a calibration profile (`profile`: another trace or the first half, so out of
sample) or, without one, from the first forward pass (the prompt).

Why the planner lost to them (issue 19, replayed on the sealed traces, Mixtral shape, both links,
25% and 50%, out of sample; predictive / best peer before -> after each fix):
1. Cold start: the peers' hot sets were loaded before decoding while the planner started empty; it
   now starts from the same profile (the most used keys loaded, the usage statistics primed).
   Greedy 50%: 0.39-0.61 -> 1.00.
2. Streaming with host cores: at >= 75% of a layer's experts the step copied all of them over the
   link while host cores idled (batch 8: 0.61-0.80). With host cores every miss is now decided on
   its own against both queues (streaming stays for GPU-only runs). Batch 8: -> 1.05-1.19.
3. Eviction priced at a copy: a victim's loss and a prefetch's were counted as copy_s even where a
   host run (cheaper on PCIe 4) would serve the next miss; both now use miss_s = min(copy, host).
4. Churn over a stable hot set: none of lru / lfu / next-use keeps the profile's hot set when
   one-off misses arrive (greedy 25%: 0.80-0.92). The adaptive rule now also shadows `hot` (keep
   the profile's hot set, LRU over the rest: the pinned peers' choice) and evicts by it when its
   shadow misses least.
5. What the rules above could not fix: on a strictly periodic trace (greedy, 25%, PCIe 4) the adaptive
   plan issued 30 prefetches of which none was used and copied 9.9 experts per token where
   KTransformers copies none (0.87 of it): a copy there costs 1.7 host runs and pays only if the
   expert is used again before it is evicted, and the learned predictor's precision, measured on a
   48-token calibration half, is too poor for its prefetch gain to be right. No per-miss rule
   knows in advance that pinning the profile's hot set and never touching the link wins on such a
   run; replaying the run's calibration does. So the default plan is chosen per run
   (simulate.choose_policy): the calibration half's first part profiles, each candidate plan (this
   planner's adaptive one, every peer's, LRU, LFU) is replayed with this cost model on its second
   part, and the fastest serves. It sees no token it will serve, so it can still pick wrong where
   the calibration misleads (measured: bench/results/cache_policies.md). Split runs pay split_s
   (activation rows to the host, the partial sum back, the host sync) in their choice and time.

Why it is only ~1.04x the best peer in the median case, measured against the upper bound on any
planner under this cost model (offload/bound.py: perfect knowledge of the routing, host cores,
link and device each at full use; bench/results/cache_policies.md has it per case). Per-token
breakdowns (simulate's `parts`, held-out halves, split run 75 us, 2026-12-08):
- Qwen3-30B-A3B / gpt-oss-120b shapes (44 of the 72 measured-host cases): attention is 0.3 ms x 48 (36) layers,
  and an expert copies in 0.17-0.53 ms, so the bound is the attention floor (Qwen, no locality,
  25%, PCIe 5: bound 16.0 ms/token = attention 14.4 + device 1.1; planner 35.1, hybrid 36.3). The
  planner's host cores and link are already within ~12% of a perfect balance at its own hit
  count (208 of 384 uses a token vs 283 for Belady with bypass); what is left is foresight: a
  miss is known one attention (0.3 ms) before it is needed, so a copy can hide behind attention
  only where it was predicted, and on the synthetic traces 13-18% of the prefetches are used
  (prefetching is still worth 1-10% on the trained-model Qwen traces: tried without). Where the best peer already sits near that
  floor the target cannot be met by any planner (Qwen greedy, PCIe 5: bound / hybrid = 1.04).
- Mixtral shape (E = 8, copy 6.4 / 14 ms, host run 8.3 ms): no temporal locality, 25%, PCIe 5:
  planner 203 ms/token (attention 9.6, device 6.8, host 116 + split host parts 67, stall 2; link
  busy 178), hybrid 230 (108 of it stall on the link), bound 101. Of the gap to the bound about
  half is hits (23.5 a token against 36.5 for Belady with bypass: foresight again) and half is
  balance: at its own hit count a perfect host/link split would take ~151 ms. The largest item of
  that half is the split's fill (the rest of W13 copied after the run so the slot holds the whole
  expert): 8 expert copies a token, 51 ms of link. Dropping the partial expert instead when its
  reuse (P x miss_s, net of the victim it spares) is worth less than the fill's link time was
  tried: +18% on greedy PCIe 4 25%, -2..-27% on the sampled and strong-locality PCIe 4 cases (the
  usage statistics underrate reuse under locality), so not adopted; it would also need a new op.
- Fast host (3 ms / Mixtral expert): host cores are the bottleneck (PCIe 4, no locality: 119 of
  132 ms/token) and the link idles; the bound moves 1 miss in 6 onto the link, which needs the
  future (a 14 ms copy replaces 3 ms host runs only if the expert is reused ~5 times before it is
  evicted). Online that is KTransformers' plan, which the planner matches (132.2 vs 132.4) or the
  per-run choice picks; the cases below 1 are that choice misled by its calibration half.
- Tried and not adopted: pricing a right prefetch at the miss it saves (miss_s, a host run where
  that is cheaper) instead of the link time it moves (min(copy, idle)). No bench case moved, and
  on a cyclic toy run (tests/test_offload_decision.py) it stopped the prefetches whose worth is
  the expert staying cached for later passes, which min(copy, idle) happens to stand in for.
So within this cost model the planner is limited by what it cannot know (the next token's
routing), not by a choice the peers make better; 1.2x the best peer in the median case would
need most of the bound's foresight (median bound / best peer: bench/results/cache_policies.md).

Eviction rules (offload/eviction.py): lru, lfu, next-use (expected distance to the next use from
calibrated usage probabilities: aware of the layer cycle), belady (the simulator's future),
layer-lru (mixtral-offloading), frequency (MoE-Infinity). The predictive policy evicts by whichever
of next-use / lru / lfu its shadow caches say missed least lately.
"""
from __future__ import annotations

from collections import deque
from typing import Mapping

import numpy as np

from moe_runtime.offload.cache import ExpertCache, Key
from moe_runtime.offload.cpu_experts import CostModel
from moe_runtime.offload.eviction import NEVER, ShadowRules, SlotTable, UsageStats
from moe_runtime.offload.plan import SCHEMES, LayerPlan, Op, Scheme, Tally
from moe_runtime.offload.predictor import PredictionStats
from moe_runtime.offload.prefetch import PrefetchQueue

INF = float("inf")
W13_SHARE = 2 / 3
"""W13 ([D, 2F], gate | up) is two thirds of a SwiGLU expert's bytes; W2 ([F, D]) the rest."""


def r_w13(host_share: float) -> float:
    """The fraction of the expert's bytes that a host share of W13's rows is."""
    return host_share * W13_SHARE


class Planner:
    """Decides every copy, eviction and host run (see module docstring). `future` (simulator
    only, belady): key -> sorted positions pass * L + layer at which the key is used."""

    def __init__(self, cache: ExpertCache, cost: CostModel, num_layers: int, *, scheme: str | Scheme = "lru",
                 cpu_experts: bool = False, stream_fraction: float = 0.75, num_experts: int,
                 max_prefetch_per_layer: int | None = None, future: Mapping[Key, list[int]] | None = None,
                 profile: np.ndarray | None = None, split_s: float = 0.0):
        self.scheme = SCHEMES[scheme] if isinstance(scheme, str) else scheme
        if self.scheme.needs_future and future is None:
            raise ValueError(f"policy {self.scheme.name!r} needs the future routing: only the simulator has it")
        self.cache, self.cost, self.L, self.E = cache, cost, num_layers, num_experts
        # the host-using peers are defined by their use of host cores: on whatever the device
        self.cpu_experts = cpu_experts or self.scheme.peer
        self.stream_fraction = stream_fraction
        if split_s < 0:
            raise ValueError(f"split_s={split_s} must be >= 0 (seconds a split run adds: activation transfers, host sync)")
        self.split_s = split_s
        """What a split run adds to its host and device parts: the activation rows to the host, the
        partial result back and the host sync between them (offload/projection.py states it for a GPU)."""
        self.copy_s, self.attn_s = cost.cal.copy_s, cost.cal.attn_s
        self.miss_s = min(self.copy_s + cost.device_time(1), cost.host_time(1)) if self.cpu_experts else self.copy_s
        """What a one-token miss costs: a copy, or with host cores whichever of copy and host run is faster."""
        self.max_prefetch = max_prefetch_per_layer or cache.num_slots
        self.queue = PrefetchQueue(max_pending=num_layers * num_experts)
        self.stats, self.pred_stats = UsageStats(num_layers, num_experts), PredictionStats()
        self.table = SlotTable(cache.num_slots, num_layers, num_experts, future)
        self.shadows = ShadowRules(cache.num_slots, num_layers, num_experts) if self.scheme.adaptive else None
        self._pred_LE = np.zeros((num_layers, num_experts))
        """Calibrated P of each key the standing predictions name (0 elsewhere)."""
        self.pending_eval: dict[int, list[tuple[int, set[int]]]] = {}
        self.hit_dist: dict[int, list[int]] = {}
        """distance -> [predicted and used, predicted]: the predictor's calibration."""
        self.t = Tally()
        self.decisions = {"wait": 0, "copy": 0, "cpu": 0}
        self.now = self.link_free = self.stall_s = 0.0
        self.parts = dict.fromkeys(("attn", "device", "host", "split_host", "split_sync", "stall", "link"), 0.0)
        """Modelled seconds by cause (diagnostic; `link`: the link's busy time, which overlaps the rest)."""
        self.ready_at: dict[Key, float] = {}
        self.prefetched: set[Key] = set()
        self.passes, self.pos, self._serving = 0, 0, 0
        self.layer_s = self.attn_s + 2 * cost.device_time(1)
        """EMA of modelled seconds per layer (to date a prediction's use)."""
        self.demand_per_layer = self.copies_per_layer = 0.0
        """EMAs of demand copies and of all copies per layer (the link's load)."""
        self._copies = 0
        self._mark = (0.0, 0)
        if profile is not None and np.shape(profile) != (num_layers, num_experts):
            raise ValueError(f"profile has shape {np.shape(profile)}; it must be (layers, experts) = "
                             f"({num_layers}, {num_experts}): uses per expert of a calibration run of this model")
        self.profile = None if profile is None else np.asarray(profile, dtype=np.float64)
        """[L, E] share of a calibration run's passes that used each key (out of sample): the hot set's source."""
        self.seen_LE = np.zeros((num_layers, num_experts))
        """Uses per key so far (the hot set's source when no profile is given: the first pass)."""
        self.fixed: set[int] = set()
        """Slots pinned for good (the hot set or llama.cpp's resident layers)."""
        if self.profile is not None:
            self.stats.prime(self.profile)
            # the pinned peers' choice as one more rule: keep the profile's hot set, LRU over the rest
            S = cache.num_slots
            hot = np.zeros((num_layers, num_experts), dtype=bool)
            flat = self.profile.reshape(-1)
            order = np.lexsort((np.arange(flat.size), -flat))[:max(0, S - max(1, S // 8))]
            hot.reshape(-1)[order[flat[order] > 0]] = True
            self.table.hot_LE = hot
            if self.shadows is not None:
                self.shadows.set_hot(hot)

    # ---------------------------------------------------------------- pinned sets
    def pinned_budget(self) -> int:
        """Slots the scheme pins: all but its staging share (at least one slot when it copies)."""
        S = self.cache.num_slots
        if self.scheme.pin == "none" or S >= self.L * self.E:
            return 0
        if self.scheme.pin == "layers":
            return (S // self.E) * self.E
        staging = max(1, round(self.scheme.staging * S)) if self.scheme.cold not in ("host",) else 0
        return max(0, S - staging)

    def hot_set(self, counts: np.ndarray) -> list[Key]:
        """The keys the scheme pins: llama.cpp the last S // E layers whole (--n-cpu-moe keeps the
        first layers' experts on the CPU); the others the most used keys of `counts` (ties: lower
        layer, lower expert), never an unused one."""
        n = self.pinned_budget()
        if n == 0:
            return []
        if self.scheme.pin == "layers":
            return [(m, e) for m in range(self.L - n // self.E, self.L) for e in range(self.E)]
        flat = np.asarray(counts, dtype=np.float64).reshape(-1)
        order = np.lexsort((np.arange(flat.size), -flat))[:n]
        return [(int(i) // self.E, int(i) % self.E) for i in order if flat[i] > 0]

    def _warm(self, profile: np.ndarray) -> list[Op]:
        """Start with the profile's most used keys in the slots (not pinned): the warm start a
        pinned scheme gets, for the schemes that evict."""
        flat = profile.reshape(-1)
        order = np.lexsort((np.arange(flat.size), -flat))[:self.cache.num_slots]
        return [self._copy((int(i) // self.E, int(i) % self.E), s) for s, i in enumerate(order) if flat[i] > 0]

    def _pin(self, keys: list[Key]) -> list[Op]:
        """Pin `keys` in slots for good: those in a slot stay, the rest are copied in over unpinned
        occupants (free slots first)."""
        ops: list[Op] = []
        for key in keys:
            if key in self.cache:
                slot = self.cache.slot_of[key]
            else:
                slot = self.table.free_slot()
                if slot is None:
                    found = self.table.victim("lru", key, self._here(), None)
                    if found is None:
                        break
                    slot = found[0]
                ops.append(self._copy(key, slot))
            self.cache.pin(slot)
            self.table.pinned_S[slot] = True
            self.fixed.add(slot)
        return ops

    # ---------------------------------------------------------------- probabilities
    def p_predicted(self, d: int) -> float:
        """Calibrated P(a key predicted at distance d is used): Laplace-smoothed measured precision."""
        tp, n = self.hit_dist.get(d, (0, 0))
        return (tp + 1) / (n + 2)

    def p_use(self, key: Key) -> float:
        """P(key is used at its layer's next run): its usage statistics, or its prediction if higher."""
        return max(self.stats.p_use(key), float(self._pred_LE[key]))

    def _here(self) -> int:
        """Position of the next layer to run; while layer m serves, its keys are next needed a pass later."""
        return self.passes * self.L + self.pos + self._serving

    def next_use(self, key: Key) -> float:
        """Expected (or, with the future, true) layers until key is next used."""
        here = self._here()
        if self.table.future is not None:
            nxt = self.table.next_pos_LE[key]
            return float(nxt - here) if nxt < NEVER else INF
        p = self.p_use(key)
        return INF if p <= 0 else (key[0] - here) % self.L + self.L * (1.0 / p - 1.0)

    # ---------------------------------------------------------------- eviction
    def victim_slot(self, incoming: Key, *, prefetch: bool, memo: dict | None = None) -> int | None:
        """A free slot, else the eviction rule's victim; None when every slot is pinned or (prefetch)
        when every candidate is expected back sooner than `incoming`. `memo`: a dict kept while no
        slot changes hands (the victim does not depend on `incoming` but for layer-lru)."""
        if self.cache.num_slots >= self.L * self.E:  # everything fits: home slots keep layers contiguous
            return incoming[0] * self.E + incoming[1]
        free = self.table.free_slot()
        if free is not None:
            return free
        rule = self.scheme.evict if self.shadows is None else self.shadows.best
        # victims are judged by usage statistics; predictions only bring experts in (protecting
        # predicted experts from demand misses cost more misses than it saved on every trace tried)
        p_LE = self.stats.p_use_LE() if rule in ("next-use", "frequency") else None
        if rule == "frequency":
            p_LE = self.stats.v * self.stats.decay ** (self.stats.runs[:, None] - self.stats.t)
        if memo is not None and rule != "layer-lru":
            if rule not in memo:
                memo[rule] = self.table.victim(rule, incoming, self._here(), p_LE, (self.passes + 1) * self.L)
            found = memo[rule]
        else:
            found = self.table.victim(rule, incoming, self._here(), p_LE, (self.passes + 1) * self.L)
        if found is None:
            return None
        slot, dist = found
        if rule in ("lru", "lfu", "hot") and self.shadows is not None:
            dist = self.next_use(self.cache.owner[slot])
        if prefetch and (rule in ("next-use", "belady") or self.shadows is not None) and dist <= self.next_use(incoming):
            return None  # never evict an expert expected back sooner than the one coming in
        if prefetch and rule in ("layer-lru", "frequency") and self.cache.owner[slot] in self.queue.predicted:
            return None  # the baselines never evict what they just predicted
        return slot

    def _assign(self, key: Key, slot: int) -> Key | None:
        old = self.cache.assign(key, slot)
        self.table.on_insert(slot, key)
        if old is not None:
            self.ready_at.pop(old, None)
            if old in self.prefetched:
                self.prefetched.discard(old)
                self.t.prefetch_wasted += 1
        return old

    def _copy(self, key: Key, slot: int, host_share: float = 0.0) -> Op:
        """Assign and queue the copy on the modelled link (FIFO); with host_share r > 0 only the
        part a split run needs on the device (all but r of W13)."""
        old = self._assign(key, slot)
        self._copies += 1
        self.link_free = self.ready_at[key] = max(self.link_free, self.now) + (1 - r_w13(host_share)) * self.copy_s
        self.parts["link"] += (1 - r_w13(host_share)) * self.copy_s
        return Op("copy", key, slot, old, host_share)

    # ---------------------------------------------------------------- 1. prefetch
    def submit(self, predictions) -> None:
        """(layer, distance, {expert: confidence}) from a predictor; remembered for calibration."""
        for j, d, experts in predictions:
            if j < self.pos or j >= self.L or (self.scheme.distances and d not in self.scheme.distances):
                continue
            self.queue.submit(j, experts, d)
            self.pending_eval.setdefault(j, []).append((d, set(experts)))
        self._pred_LE[:] = 0.0
        for k, r in self.queue.pending.items():
            self._pred_LE[k] = self.p_predicted(r.distance)
        for k in self.queue.predicted:
            if not self._pred_LE[k]:
                self._pred_LE[k] = self.p_predicted(k[0] - self.pos)

    def preload(self) -> list[Op]:
        """When every expert fits, all are copied to their home slots once, before any step: the
        cache is then the resident model (no cold misses, no decisions). Else a pinned scheme's
        set when it is known before any step (llama.cpp's layers; a hot set from a profile): loaded
        like a model's resident weights. [] otherwise."""
        if self.cache.num_slots < self.L * self.E:
            if self.scheme.pin == "layers" or (self.scheme.pin == "hot" and self.profile is not None):
                ops = self._pin(self.hot_set(self.profile))
            elif self.profile is not None and not self.scheme.needs_future:
                ops = self._warm(self.profile)
            else:
                return []
            self.link_free, self.ready_at, self.parts["link"] = 0.0, {}, 0.0
            return ops
        ops = [self._copy((m, e), m * self.E + e) for m in range(self.L) for e in range(self.E)]
        self.link_free, self.ready_at, self.parts["link"] = 0.0, {}, 0.0  # landed before the first step; not workload traffic
        return ops

    def layer_resident(self, m: int) -> bool:
        """Every expert fits and layer m's are all in (their home) slots: nothing left to decide."""
        return self.cache.num_slots >= self.L * self.E and all((m, e) in self.cache for e in range(self.E))

    def prefetch(self, m: int, predictions=()) -> list[Op]:
        """Before layer m's attention: take predictions, cancel stale requests, issue what pays."""
        if self.layer_resident(m):
            return []
        self.pos = m
        if predictions:
            self.submit(predictions)
        if self.scheme.prefetch == "none":
            return []
        cands = self._candidates(m, m + 1)
        if self.scheme.frequency_candidates:
            cands.update({k: v for k, v in self._frequency_candidates(m + 1, 1).items() if k not in self.cache})
        return self._prefetch_round(cands, self.now + self.attn_s, self.scheme.prefetch == "cost")

    def _prefetch_round(self, cands: dict[Key, tuple[int, float]], window_end: float, cost_rule: bool) -> list[Op]:
        """Issue the candidates that pay (cost rule) or all of them in deadline order, while the link
        is free by `window_end` (the end of the compute it overlaps)."""
        ops: list[Op] = []
        while cands and len(ops) < self.max_prefetch:
            key = self._best(cands, window_end) if cost_rule else min(cands, key=lambda k: (cands[k][0], -cands[k][1]))
            if key is None:
                break
            deadline, p = cands.pop(key)
            self.queue.pending.pop(key, None)
            slot = self.victim_slot(key, prefetch=True)
            if slot is None:
                continue
            victim = self.cache.owner[slot]
            if cost_rule and self._gain(deadline, p, window_end) <= self._evict_cost(victim, deadline, p):
                continue
            ops.append(self._copy(key, slot))
            self.prefetched.add(key)
            self.t.prefetch_issued += 1
        return ops

    def _candidates(self, first: int, last: int) -> dict[Key, tuple[int, float]]:
        """Prefetch candidates not in a slot, key -> (deadline, P): standing predictions for layers
        from `first` on and (predictive) the experts layers first..last used last pass."""
        cands = {k: (r.deadline, float(self._pred_LE[k])) for k, r in self.queue.pending.items()
                 if k[0] >= first and k not in self.cache}
        if self.scheme.recency_candidates:
            for j in range(first, min(self.L, last + 1)):
                for e in self.stats.last[j]:
                    if (j, e) not in self.cache and (j, e) not in cands:
                        cands[(j, e)] = (j, self.stats.p_use((j, e)))
        return cands

    def _frequency_candidates(self, m: int, depth: int) -> dict[Key, tuple[int, float]]:
        """MoE-Infinity: per coming layer, its most frequently activated experts (as many as the
        layer used last run)."""
        out: dict[Key, tuple[int, float]] = {}
        for j in range(m, min(self.L, m + depth + 1)):
            n = len(self.stats.last[j])
            ranked = sorted(range(self.E), key=lambda e: -self.stats.frequency((j, e)))[:n]
            for e in ranked:
                out[(j, e)] = (j, self.stats.frequency((j, e)))
        return out

    def _gain(self, deadline: int, p: float, window_end: float) -> float:
        """Expected seconds a prefetch saves, before its eviction's cost. Right (P): it moves link
        work into time the link would idle before the use (attention now; the layers before the
        deadline beyond their expected demand copies), so it saves min(copy, idle). Wrong (1 - P):
        the part of its copy outside idle time delays demand copies by as much."""
        start = max(self.link_free, self.now)
        ahead = deadline - self.pos
        idle = max(0.0, window_end - start) + max(0.0, ahead * (self.layer_s - self.copies_per_layer * self.copy_s))
        used = min(self.copy_s, idle)
        taken = (self.copy_s - used) * min(1.0, self.demand_per_layer)
        return p * used - (1 - p) * taken

    def _evict_cost(self, victim: Key | None, deadline: int, p: float) -> float:
        """The miss an eviction may cause: P(victim used again) x copy. For the layer about to run it
        is weighted by (1 - P): had the prediction been right, its demand miss would have evicted
        at the same moment anyway; a prefetch further ahead evicts that much earlier."""
        if victim is None:
            return 0.0
        cost = self.p_use(victim) * self.miss_s
        return (1 - p) * cost if deadline == self.pos else cost

    def _best(self, cands: dict[Key, tuple[int, float]], window_end: float) -> Key | None:
        """The candidate with the largest positive gain, if the link is idle by `window_end`."""
        if self.link_free > window_end:
            return None
        best, best_gain = None, 0.0
        for k, (deadline, p) in cands.items():
            g = self._gain(deadline, p, window_end)
            if g > best_gain:
                best, best_gain = k, g
        return best

    # ---------------------------------------------------------------- 2. the MoE step
    def serve(self, m: int, counts: Mapping[int, int]) -> LayerPlan:
        """Layer m routes counts[e] tokens to expert e (only e with counts > 0). Returns the ops in
        execution order and advances the modelled time by attention, waits and expert runs."""
        self.pos, self._serving = m, 1
        needed = sorted(counts)
        self.seen_LE[m, needed] += 1
        self._score(m, needed)
        # the layer's uses count from now: its experts are next needed a pass later
        self.stats.observe(m, needed)
        self.table.used(m, needed, self.passes * self.L + m)
        cancelled = [k for k in self.queue.pending if k[0] <= m]
        self.t.prefetch_cancelled += len(cancelled)
        self.queue.layer_done(m)
        self.now += self.attn_s
        self.parts["attn"] += self.attn_s
        plan = LayerPlan()
        hits = [e for e in needed if (m, e) in self.cache]
        misses = [e for e in needed if (m, e) not in self.cache]
        t = self.t
        t.expert_uses += len(needed)
        t.hits += len(hits)
        t.misses += len(misses)
        # with host cores every miss is decided on its own against both queues (streaming a whole
        # layer over the link would leave the host cores idle while most of the layer is needed)
        plan.stream = not self.cpu_experts and len(needed) >= self.stream_fraction * self.E and len(needed) > 1
        self._serve_hits(m, hits, counts, plan)
        copy, host = self._decide_misses(m, misses, counts, plan)
        self._fetch_and_run(m, copy, counts, plan, host)
        for e in host if not self.scheme.peer else ():
            self._admit_in_background((m, e), plan)
        if self.shadows is not None:
            self.shadows.observe(m, needed, self._here(), self.stats.p_use_LE())
        self._pred_LE[: m + 1] = 0.0
        self._serving = 0
        self.pos = m + 1
        # EMAs from the end of one MoE step to the end of the next: the link's load per layer
        self.layer_s = 0.9 * self.layer_s + 0.1 * (self.now - self._mark[0])
        self.demand_per_layer = 0.9 * self.demand_per_layer + 0.1 * len(copy)
        self.copies_per_layer = 0.9 * self.copies_per_layer + 0.1 * (self._copies - self._mark[1])
        self._mark = (self.now, self._copies)
        return plan

    def _run(self, key: Key, n: int, plan: LayerPlan, host_share: float = 0.0) -> None:
        """Run key from its slot, waiting for its copy; a split run (host_share > 0) first runs
        its share of W13 on host cores (while the device part lands), then fills the slot."""
        if host_share:
            self.now += r_w13(host_share) * self.cost.host_time(n) + self.split_s
            self.parts["split_host"] += r_w13(host_share) * self.cost.host_time(n)
            self.parts["split_sync"] += self.split_s
            self.t.split_runs += 1
        wait = max(0.0, self.ready_at.pop(key, 0.0) - self.now)
        self.stall_s += wait
        self.now += wait + self.cost.device_time(n)
        self.parts["stall"] += wait
        self.parts["device"] += self.cost.device_time(n)
        self.table.on_access(key)
        if key in self.prefetched:
            self.prefetched.discard(key)
            self.t.prefetch_used += 1
        slot = self.cache.slot_of[key]
        plan.ops.append(Op("split" if host_share else "run", key, slot, host_share=host_share))
        if host_share:  # the rest of W13, behind whatever is queued; the next use waits for it
            self.link_free = self.ready_at[key] = max(self.link_free, self.now) + r_w13(host_share) * self.copy_s
            self.parts["link"] += r_w13(host_share) * self.copy_s
            plan.ops.append(Op("fill", key, slot, host_share=host_share))

    def _split_share(self, n: int, host_busy: float) -> float:
        """The share r of W13's rows host cores take so that they finish when the rest of the
        expert lands: busy + r W H = queue + (1 - r W) C, with W = W13's share of the expert's
        bytes, H the host time, C the copy time and busy the host work queued before it. The
        split then lands r W C sooner than the whole copy, less split_s (its transfers and sync): 0
        (no split) when that is under 5% of the copy or not positive."""
        C, H = self.copy_s, self.cost.host_time(n)
        queued = max(self.link_free, self.now) - self.now
        r = min(1.0, (queued + C - host_busy - self.split_s) / (W13_SHARE * (H + C)))
        return r if r_w13(r) >= 0.05 and r_w13(r) * C > self.split_s else 0.0

    def _host(self, key: Key, n: int, plan: LayerPlan) -> None:
        self.now += self.cost.host_time(n)
        self.parts["host"] += self.cost.host_time(n)
        self.t.cpu_served += 1
        plan.ops.append(Op("cpu", key))

    def _serve_hits(self, m: int, hits: list[int], counts, plan: LayerPlan) -> None:
        landed = sorted(hits, key=lambda e: self.ready_at.get((m, e), 0.0) > self.now)  # landed first
        allow_cpu = self.cpu_experts and not plan.stream
        for e in landed:
            key, n = (m, e), counts[e]
            remaining = self.ready_at.get(key, 0.0) - self.now
            if remaining > 0:
                dec = self.cost.decide(n, remaining, allow_cpu)
                self.decisions[dec] += 1
                if dec == "cpu":  # the copy keeps landing; the next use is a plain hit
                    self._host(key, n, plan)
                    continue
                self.t.late_hits += 1
            self._run(key, n, plan)

    def _decide_misses(self, m: int, misses: list[int], counts, plan: LayerPlan) -> tuple[list[int], list[int]]:
        """Each miss: copy (behind the link's queue and the copies decided before it; a copy also
        keeps the expert for its next use) or host cores, which run while those copies fly.
        Returns (copy, host)."""
        if plan.stream:
            self.t.stream_steps += 1
            self.t.stream_copies += len(misses)
            return misses, []
        self.t.cache_steps += 1
        if self.scheme.peer:
            return self._peer_misses(misses, counts)
        copy, host, host_s = [], [], 0.0
        options = self._prefetch_options(m) if self.cpu_experts and misses else []  # the same for every miss
        for e in misses:
            queued = max(self.link_free, self.now) - self.now + len(copy) * self.copy_s
            # a copy also leaves the expert cached: worth P(used again) x the next miss it avoids
            keep = self.p_use((m, e)) * self.miss_s if self.cpu_experts else 0.0
            # host cores free the link for as long as they run: what a prefetch would save in that time
            spare = self._prefetch_value(options, host_s + self.cost.host_time(counts[e]))
            dec = self.cost.decide(counts[e], None, self.cpu_experts, queued_s=queued - host_s - keep + spare)
            self.decisions[dec] += 1
            if dec == "cpu":
                host.append(e)
                host_s += self.cost.host_time(counts[e])
            else:
                copy.append(e)
        self.t.demand_copies += len(copy)
        return copy, host

    def _keep_value(self, key: Key) -> float:
        """What a copied miss is worth beyond this step: the miss it saves next time, less the one
        the eviction of its victim may cause (a host run evicts nothing)."""
        slot = None if self.table.free_slot() is not None else self.table.victim(
            self.shadows.best if self.shadows is not None else self.scheme.evict, key, self._here(),
            self.stats.p_use_LE())
        victim = self.cache.owner[slot[0]] if slot is not None else None
        lost = self.p_use(victim) if victim is not None else 0.0
        return (self.p_use(key) - lost) * self.miss_s

    def _peer_misses(self, misses: list[int], counts) -> tuple[list[int], list[int]]:
        """A peer's published rule for each miss (Scheme.cold): host | fiddler | parallel."""
        copy, host, host_s = [], [], 0.0
        for e in misses:
            n = counts[e]
            if self.scheme.cold == "host":
                dec = "cpu"
            elif self.scheme.cold == "fiddler":  # each expert alone: CPU unless copy + device run is faster
                dec = self.cost.decide(n, None, True)
            else:  # parallel: whichever of the link (behind its queue) and host cores (behind theirs) finishes first
                queued = max(self.link_free, self.now) - self.now + len(copy) * self.copy_s
                dec = "copy" if queued + self.copy_s + self.cost.device_time(n) < host_s + self.cost.host_time(n) else "cpu"
            self.decisions[dec] += 1
            if dec == "cpu":
                host.append(e)
                host_s += self.cost.host_time(n)
            else:
                copy.append(e)
        self.t.demand_copies += len(copy)
        return copy, host

    def _fetch_and_run(self, m: int, experts: list[int], counts, plan: LayerPlan, host: list[int] = ()) -> None:
        """Misses, pipelined: up to `window` copies ahead (half the pool when streaming), each run
        in order; a slot is reusable once its expert ran, so a single slot still progresses.
        Host-served experts run once the first copies are on the link, overlapping them."""
        window = max(1, self.cache.num_slots // 2) if plan.stream else self.cache.num_slots
        todo, issued, host = deque(experts), deque(), list(host)
        # the first copied miss runs split (part on host cores after their other runs, part copied)
        split = self.cpu_experts and not plan.stream and not self.scheme.peer
        host_busy = sum(self.cost.host_time(counts[e]) for e in host)
        while todo or issued or host:
            while todo and len(issued) < window:
                key = (m, todo[0])
                slot = self.victim_slot(key, prefetch=False)
                if slot is None:
                    break  # every slot holds a miss of this step that has not run yet
                todo.popleft()
                r = self._split_share(counts[key[1]], host_busy) if split else 0.0
                split = False
                plan.ops.append(self._copy(key, slot, r))
                self.cache.pin(slot)
                self.table.pinned_S[slot] = True
                issued.append((key, slot, r))
            if host and self.scheme.prefetch == "cost":
                # the link idles while host cores run: prefetch the next layers behind the demand copies
                plan.ops += self._prefetch_round(self._candidates(m + 1, m + 1), self.now + host_busy, True)
            for e in host:
                self._host((m, e), counts[e], plan)
            host = []
            if not issued:
                continue
            key, slot, r = issued.popleft()
            self.cache.unpin(slot)
            self.table.pinned_S[slot] = False
            self._run(key, counts[key[1]], plan, r)

    def _prefetch_options(self, m: int) -> list[tuple[int, float, float]]:
        """(deadline, P, eviction cost) of each prefetch candidate for the layers after m that has
        a victim slot (none unless the scheme prefetches by the cost rule)."""
        if self.scheme.prefetch != "cost":
            return []
        out, memo = [], {}
        for key, (deadline, p) in self._candidates(m + 1, m + 1).items():
            slot = self.victim_slot(key, prefetch=True, memo=memo)
            if slot is not None:
                out.append((deadline, p, self._evict_cost(self.cache.owner[slot], deadline, p)))
        return out

    def _prefetch_value(self, options: list[tuple[int, float, float]], host_s: float) -> float:
        """Expected seconds saved by the best of `options` that the link could carry while host
        cores run for host_s (its gain less its eviction's cost; 0 if none pays)."""
        return max([0.0] + [self._gain(d, p, self.now + host_s) - cost for d, p, cost in options])

    def _admit_in_background(self, key: Key, plan: LayerPlan) -> None:
        """A host-served expert takes a slot only when the link is idle and nothing queued waits,
        and (predictive) only over an expert expected back later."""
        if self.queue.pending or self.link_free > self.now or key in self.cache:
            return
        slot = self.victim_slot(key, prefetch=True)
        if slot is None:
            return
        plan.ops.append(self._copy(key, slot))
        self.t.background_copies += 1

    def _score(self, m: int, needed: list[int]) -> None:
        """Calibration: each prediction for layer m against what it used."""
        scored = self.pending_eval.pop(m, [])
        used = set(needed)
        for d, predicted in scored:
            self.pred_stats.update(m, d, predicted, used)
            c = self.hit_dist.setdefault(d, [0, 0])
            c[0] += len(predicted & used)
            c[1] += len(predicted)

    def end_pass(self) -> list[Op]:
        """A forward pass ended: predictions never go past it. A hot-set scheme without a profile
        pins the most used keys of this first pass (its calibration prefix); returns those copies."""
        self.queue.reset()
        self.pending_eval.clear()
        self._pred_LE[:] = 0.0
        ops: list[Op] = []
        if self.passes == 0 and self.scheme.pin == "hot" and self.profile is None and not self.fixed \
                and self.cache.num_slots < self.L * self.E:
            ops = self._pin(self.hot_set(self.seen_LE))
        self.passes += 1
        self.pos = 0
        return ops


__all__ = ["Planner", "Scheme", "SCHEMES", "Op", "LayerPlan", "Tally"]
