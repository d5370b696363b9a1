"""The simulator's fast paths decide exactly what the slot-table rules decide (issue 19: a faster
simulator must not change a single decision)."""
import numpy as np
import pytest

from moe_runtime.offload.eviction import SlotTable, _RecencyShadow


def _slot_table_shadow(rule, S, L, E, hot, routing):
    """The reference: a SlotTable-backed demand shadow (the rule's vectorised victim), its misses per layer."""
    table, where, out = SlotTable(S, L, E, None), {}, []
    if hot is not None:
        table.hot_LE = hot
    for m, used in routing:
        keys = [(m, e) for e in used]
        missed = [k for k in keys if k not in where]
        for k in keys:
            if k in where:
                table.on_access(k)
        for k in missed:
            slot = table.free_slot()
            if slot is None:
                found = table.victim(rule, k, 0, None)
                if found is None:
                    continue
                slot = found[0]
                del where[(int(table.layer_S[slot]), int(table.expert_S[slot]))]
            table.on_insert(slot, k)
            table.on_access(k)
            table.pinned_S[slot] = True
            where[k] = slot
        table.pinned_S[:] = False
        out.append((len(missed), sorted(where)))
    return out


@pytest.mark.parametrize("rule", ["lru", "hot"])
@pytest.mark.parametrize("S", [1, 3, 10, 40])
def test_recency_shadow_matches_slot_table(rule, S):
    L, E, K = 4, 16, 3
    rng = np.random.default_rng(S)
    hot = rng.random((L, E)) < 0.3 if rule == "hot" else None
    zipf = 1.0 / np.arange(1, E + 1) ** 1.1
    routing = [(m, sorted(rng.choice(E, K, replace=False, p=zipf / zipf.sum()).tolist()))
               for _ in range(60) for m in range(L)]
    ref = _slot_table_shadow(rule, S, L, E, hot, routing)
    shadow, got = _RecencyShadow(S, hot), []
    for m, used in routing:
        keys = [(m, e) for e in used]
        missed = [k for k in keys if k not in shadow]
        for k in keys:
            if k in shadow:
                shadow.touch(k)
        pinned = set()
        for k in missed:
            if shadow.admit(k, pinned):
                pinned.add(k)
        got.append((len(missed), sorted([*shadow.cold, *shadow.hot])))
    assert got == ref
