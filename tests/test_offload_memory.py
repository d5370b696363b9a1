"""No memory growth: over 1,000 generated tokens the live tensors, their storage bytes, the host
store, the slot pool and every bookkeeping table stay the same size after warm-up."""
from __future__ import annotations

import gc

import pytest
import torch

from moe_runtime.core.model import KVCache
from moe_runtime.offload.engine import ExpertCacheEngine
from tests.test_offload_support import single_thread, tiny_cfg, twin_models  # noqa: F401

TOKENS, WARMUP = 1000, 40


def _live_tensors() -> tuple[int, int]:
    """(number of live tensor objects, bytes of their distinct storages)."""
    gc.collect()
    tensors = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return len(tensors), sum(storages.values())


def _tables(engine: ExpertCacheEngine) -> dict[str, int]:
    rt = engine.runtime
    return {"slots_used": len(rt.cache.slot_of), "tickets": len(rt.tickets), "inflight": len(engine.copies.inflight),
            "prefetched": len(rt.prefetched), "pending": len(rt.queue.pending), "eval": len(rt.pending_eval),
            "pred_keys": len(rt.pred_stats.counts)}


@pytest.mark.parametrize("policy,cpu_experts", [("predictive", True), ("lru", False)])
def test_no_growth_over_1000_tokens(policy, cpu_experts):
    cfg = tiny_cfg("pre_attention" if policy == "predictive" else "post_attention", max_seq_len=TOKENS + 8)
    _, model = twin_models(cfg)
    engine = ExpertCacheEngine(model, gpu_expert_slots=5, policy=policy, cpu_experts=cpu_experts, device="cpu")
    store_ptr, pool_ptr = engine.store.storage_ptrs(), engine.pool.buffer.data_ptr()
    cache = KVCache.empty(cfg, 1, TOKENS + 4, "cpu", torch.float32)
    nxt = engine.forward(torch.tensor([[1, 2, 3, 4]]), cache).logits[:, -1].argmax(-1)
    before = None
    for i in range(TOKENS - 1):
        if i == WARMUP:
            before = (_live_tensors(), _tables(engine))
        nxt = engine.forward(nxt[:, None], cache).logits[:, -1].argmax(-1)
    after = (_live_tensors(), _tables(engine))
    assert after[0] == before[0], f"live tensors / storage bytes grew: {before[0]} -> {after[0]}"
    for name, n in after[1].items():
        assert n <= max(before[1][name], engine.pool.num_slots, cfg.num_moe_layers * cfg.moe.num_experts), name
    assert after[1]["pred_keys"] == before[1]["pred_keys"] and after[1]["slots_used"] <= 5
    assert engine.store.storage_ptrs() == store_ptr and engine.pool.buffer.data_ptr() == pool_ptr
    assert cache.length == TOKENS + 3
    assert engine.runtime.c.expert_uses >= TOKENS * 3, "every MoE layer ran for every token"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_or_pinned_growth_on_gpu():
    cfg = tiny_cfg("pre_attention", max_seq_len=TOKENS + 8)
    _, model = twin_models(cfg)
    engine = ExpertCacheEngine(model, gpu_expert_slots=5, policy="predictive", cpu_experts=True, device="cuda")
    assert engine.store.pinned
    cache = KVCache.empty(cfg, 1, TOKENS + 4, "cuda", torch.float32)
    nxt = engine.forward(torch.tensor([[1, 2, 3, 4]]), cache).logits[:, -1].argmax(-1)
    host_stats = getattr(torch.cuda, "host_memory_stats", None)
    for i in range(TOKENS - 1):
        if i == WARMUP:
            torch.cuda.synchronize()
            dev0 = torch.cuda.memory_allocated()
            host0 = host_stats()["allocated_bytes.current"] if host_stats else None
        nxt = engine.forward(nxt[:, None], cache).logits[:, -1].argmax(-1)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == dev0
    if host_stats:
        assert host_stats()["allocated_bytes.current"] == host0
