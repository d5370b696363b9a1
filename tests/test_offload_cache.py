"""Slot cache, policies, prefetch queue and copy engine under random access sequences.

The runtime test fills the slot pool with NaN first: a slot read before its copy landed, or read
for an expert that no longer owns it, poisons the output, which must equal each expert computed
straight from the host store, exactly.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from moe_runtime.offload.cache import POLICIES, ExpertCache, SlotPool, StaleSlotError
from moe_runtime.offload.cpu_experts import Calibration, CostModel, expert_forward, interpolate
from moe_runtime.offload.copy_engines import HostCopyEngine
from moe_runtime.offload.eviction import SlotTable
from moe_runtime.offload.prefetch import PrefetchQueue
from moe_runtime.offload.runtime import OffloadRuntime
from moe_runtime.offload.store import ExpertLayout, HostExpertStore
from tests.test_offload_support import single_thread  # noqa: F401

LAYOUT = ExpertLayout(num_layers=3, num_experts=6, d_model=8, d_expert=4, dtype=torch.float32)


def _store() -> HostExpertStore:
    store = HostExpertStore(LAYOUT, pin=False)
    store.buffer.copy_(torch.randn(store.buffer.shape, generator=torch.Generator().manual_seed(0)))
    return store


def _cal(copy_s: float, host_s: float) -> Calibration:
    return Calibration(device="cpu", expert_bytes=LAYOUT.expert_bytes, copy_s=copy_s, tokens=(1, 8),
                       host_s=(host_s, 8 * host_s), device_s=(1e-6, 8e-6), act_s_per_token=0.0, attn_s=2e-5)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("slots", [1, 2, 5, 18])
@pytest.mark.parametrize("cpu", [False, True])
def test_random_routing_never_reads_a_wrong_or_unfilled_slot(policy, slots, cpu):
    rng = random.Random(slots * 31 + len(policy) + cpu)
    store = _store()
    pool = SlotPool(slots, LAYOUT, "cpu")
    pool.buffer.fill_(float("nan"))
    copies = HostCopyEngine(store, pool)
    cal = _cal(1e-5, rng.choice([1e-7, 1.0]) if cpu else 1.0)
    rt = OffloadRuntime(store, pool, ExpertCache(slots, policy), copies, CostModel(cal), cpu_experts=cpu,
                        stream_fraction=0.75, max_inflight=2)
    E = LAYOUT.num_experts
    for step in range(150):
        m = step % LAYOUT.num_layers
        if rng.random() < 0.7:  # a predictor's guess for this layer and the next, right or wrong
            rt.begin_layer(m, [(j, j - m, {e: rng.random() for e in rng.sample(range(E), rng.randint(1, 3))})
                               for j in (m, m + 1) if j < LAYOUT.num_layers])
        counts_E = torch.tensor([rng.choice([0, 0, 1, 2, 3]) for _ in range(E)])
        if rng.random() < 0.15:
            counts_E = torch.randint(1, 4, (E,))  # nearly every expert: the stream regime
        n = int(counts_E.sum())
        x = torch.randn(n, LAYOUT.d_model)
        y = rt.run_experts(m, x, counts_E)
        at = 0
        for e, c in enumerate(counts_E.tolist()):
            want = expert_forward(x[at:at + c], store.w13(m, e), store.w2(m, e), torch.tensor([c]))
            assert torch.equal(y[at:at + c], want), f"step {step}: expert ({m}, {e}) computed from a wrong slot"
            at += c
        rt.cache.check_invariants()
        # only a pinned scheme's set (llama.cpp's layers, a hot set) stays pinned, once each
        assert all(rt.cache.pins[s] == (s in rt.planner.fixed) for s in range(slots)), "a step left a slot pinned"
        assert set(rt.tickets) <= set(rt.cache.slot_of), "a ticket outlived its expert's slot"
        if m == LAYOUT.num_layers - 1:
            rt.end_pass()
    assert rt.c.expert_uses == rt.c.hits + rt.c.misses > 0
    assert copies.bytes_moved == copies.copies * LAYOUT.expert_bytes


def test_cache_table_invariants_and_stale_handles():
    rng = random.Random(7)
    cache = ExpertCache(4, "lru")
    handles = []
    for _ in range(400):
        key = (rng.randrange(3), rng.randrange(6))
        if key not in cache:  # the Planner decides victims; any unpinned slot exercises the table
            free = [s for s in range(4) if cache.pins[s] == 0]
            if free:
                cache.assign(key, rng.choice(free))
        if key in cache and rng.random() < 0.3:
            handles.append(cache.handle(key))
        if key in cache and rng.random() < 0.2:
            cache.pin(cache.lookup(key))
        if rng.random() < 0.2:
            for s in range(4):
                if cache.pins[s]:
                    cache.unpin(s)
        cache.check_invariants()
    for h in handles:
        if cache.owner[h.slot] == h.key and cache.generation[h.slot] == h.generation:
            assert cache.check_handle(h) == h.slot
        else:
            with pytest.raises(StaleSlotError, match=f"slot {h.slot} was reassigned from"):
                cache.check_handle(h)
    with pytest.raises(ValueError, match="policy='fifo' is not one of"):
        ExpertCache(4, "fifo")


def test_eviction_rules_choose_the_expected_victim():
    """One eviction system (offload/eviction.py): LRU, LFU (ties: least recent) and next-use."""
    def table(rule_uses):
        t = SlotTable(3, 2, 4, None)
        for s in range(3):
            t.on_insert(s, (0, s))
        for key, uses in rule_uses:
            for _ in range(uses):
                t.on_access(key)
        return t
    lru = table([((0, 1), 1), ((0, 0), 1), ((0, 2), 1)])
    assert lru.victim("lru", (1, 0), 0, None)[0] == 1
    lfu = table([((0, 0), 3), ((0, 1), 1), ((0, 2), 2)])
    assert lfu.victim("lfu", (1, 0), 0, None)[0] == 1
    lfu.pinned_S[1] = True
    assert lfu.victim("lfu", (1, 0), 0, None)[0] == 2, "a pinned slot is never a victim"
    p_LE = np.full((2, 4), 0.5)
    p_LE[0, 0] = 0.9  # used again soon
    p_LE[0, 2] = 0.1  # expected back last
    assert table([]).victim("next-use", (1, 0), 0, p_LE)[0] == 2
    lfu.pinned_S[:] = True
    assert lfu.victim("lfu", (1, 0), 0, None) is None


def test_prefetch_queue_deadlines_and_preemption():
    q = PrefetchQueue(max_pending=10)
    q.submit(2, {5: 0.9, 6: 0.4}, distance=1)
    q.submit(1, {3: 0.2, 4: 0.8}, distance=0)
    assert [q.pop().key for _ in range(2)] == [(1, 4), (1, 3)], "nearest layer first, most confident first"
    q.submit(2, {5: 0.95, 7: 0.7}, distance=0)  # nearer, more certain: replaces layer 2's queued guess
    assert q.preempted == 1 and set(q.pending) == {(2, 5), (2, 7)}
    q.submit(2, {1: 0.99}, distance=1)  # farther than the standing prediction: ignored
    assert set(q.pending) == {(2, 5), (2, 7)} and (2, 1) not in q.predicted
    q.layer_done(2)
    assert not q.pending and not q.predicted
    small = PrefetchQueue(max_pending=2)
    small.submit(0, {0: 0.5}, 0)
    small.submit(3, {1: 0.9, 2: 0.1}, 3)
    assert set(small.pending) == {(0, 0), (3, 1)} and small.dropped == 1


def test_host_copy_engine_runs_in_stream_order():
    store, pool = _store(), SlotPool(1, LAYOUT, "cpu")
    eng = HostCopyEngine(store, pool)
    first, second = eng.issue((0, 1), 0), eng.issue((2, 3), 0)
    assert not eng.ready(first) and eng.num_inflight() == 2
    eng.wait(second)
    assert eng.ready(first) and torch.equal(pool.w13_SDF2[0], store.w13(2, 3))
    assert eng.bytes_moved == 2 * LAYOUT.expert_bytes and eng.num_inflight() == 0


def test_store_and_pool_accounting():
    store = HostExpertStore(LAYOUT, pin=False)
    assert store.nbytes == LAYOUT.total_bytes == 3 * 6 * (8 * 8 + 4 * 8) * 4
    assert store.w13(1, 2).data_ptr() == store.buffer.data_ptr() + (1 * 6 + 2) * 8 * 8 * 4
    assert store.report()["total_bytes"] == store.nbytes and not store.report()["pinned"]
    assert SlotPool.slots_for_gib(2.5 * LAYOUT.expert_bytes / 2**30, LAYOUT) == 2
    with pytest.raises(ValueError, match="holds no expert"):
        SlotPool.slots_for_gib(0.5 * LAYOUT.expert_bytes / 2**30, LAYOUT)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin=True needs CUDA"):
            HostExpertStore(LAYOUT, pin=True)


def test_cost_model_interpolates_measurements():
    cm = CostModel(Calibration(device="cpu", expert_bytes=100, copy_s=2.0, tokens=(1, 4), host_s=(1.0, 4.0),
                               device_s=(0.5, 0.5), act_s_per_token=0.0))
    assert interpolate((1, 4), (1.0, 4.0), 8) == pytest.approx(8.0)
    assert cm.decide(1, None, allow_cpu=True) == "cpu"      # host 1.0 < copy 2.0 + 0.5
    assert cm.decide(4, None, allow_cpu=True) == "copy"     # copy 2.5 < host 4.0
    assert cm.decide(4, 0.1, allow_cpu=True) == "wait"
    assert cm.decide(1, None, allow_cpu=False) == "copy"
    assert cm.prefers_copy(4) and not cm.prefers_copy(1)
