"""CUDA-graph decode for DecodeBatch (`moe serve --cuda-graphs`, `DecodeBatch(cuda_graphs=True)`).

Legend: b rows of a bucket (cache rows 0 .. b-1), K key slots (the cache's whole length), V vocab,
Hk key/value heads, D model dim.

A decode step of a small batch on a GPU is launch-bound: a few hundred kernels of microseconds
each, every one launched from Python. A CUDA graph records the step's kernels once and replays
them with one launch. A graph fixes every shape and address, so the step is recast in static
form, one graph per batch-size bucket b (1, 2, 4, ... max_batch):

1. Static inputs: one [4, b] int64 device buffer (token, rotary position, cache slot, active flag
   per row), filled by one host->device copy per step. Cache rows 0 .. b-1 take part (a view of
   the KV cache, no gather); rows that do not decode this step (free, or mid chunked-prefill) are
   inactive: they write to the cache's last slot (scratch, never a real token: the cache keeps one
   slot of slack) and their logits are dropped.
2. The body is the model's own blocks (MoETransformer._run_blocks with an AttentionBatch whose
   writes go through a flat index computed in the graph, and whose keys are all K slots under a
   mask: the slots marked valid, plus the row's own slot), so every model feature runs unchanged.
   The KV-cache validity of the new slots is written in the graph too (inactive rows write False
   to their scratch slot).
3. Capture: two warm-up runs on a side stream (Triton compiles, cuBLAS picks its kernels), then
   torch.cuda.graph into one memory pool shared by every bucket. A bucket is captured the first
   time a step needs it (or all at once with capture_all()).
4. After a replay the host advances the per-row counters (lengths, positions) as an eager step would.

Needs every expert in a device slot (the offload runtime's other paths read counts on the host,
which a graph cannot do); ExpertCacheEngine.decode_batch checks it. Attention reads all K slots
each step (masked), so a long context costs more per step than the eager path, which reads up to
the longest row. Expert-cache statistics do not count replayed steps.
"""
from __future__ import annotations

import torch

from moe_runtime.core.model import AttentionBatch, KVCache

CUDA_GRAPHS_NEED_CUDA = "--cuda-graphs needs a CUDA device"


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: powers of two below max_batch, and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


def bucket_for(rows_needed: int, buckets: list[int]) -> int:
    """The smallest bucket that holds cache rows 0 .. rows_needed-1."""
    for b in buckets:
        if b >= rows_needed:
            return b
    raise ValueError(f"{rows_needed} rows do not fit the largest bucket ({buckets[-1]})")


def check_graph_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"{CUDA_GRAPHS_NEED_CUDA} (this model is on {device}); drop --cuda-graphs "
                         f"(cuda_graphs=False) or load the model with --device cuda")


class GraphDecoder:
    """Decode steps of a DecodeBatch's KV cache through one CUDA graph per bucket (module docstring).

    capture=False runs the same static body without recording (any device): the tests check the
    bookkeeping on the CPU with it."""

    def __init__(self, model, cache: KVCache, max_batch: int, *, capture: bool = True):
        if capture:
            check_graph_device(cache.k.device)
        self.model, self.cache, self.capture = model, cache, capture
        self.buckets = graph_buckets(max_batch)
        self.scratch = cache.max_len - 1
        self.graphs: dict[int, tuple[object | None, torch.Tensor, torch.Tensor]] = {}
        """bucket -> (graph or None, [4, b] static input, [b, V] static logits)."""
        self.pool = None
        self.replays = 0

    # ---------------------------------------------------------------- host side
    def host_inputs(self, rows: list[int], tokens: list[int], b: int) -> torch.Tensor:
        """[4, b] int64 (host): token, position, slot, active for cache rows 0 .. b-1. The decoding
        rows get their last token at their own position and next slot; the others are inactive."""
        buf = torch.zeros(4, b, dtype=torch.long)
        buf[2].fill_(self.scratch)
        for r, t in zip(rows, tokens):
            buf[0, r], buf[1, r], buf[2, r], buf[3, r] = t, self.cache.next_pos[r], self.cache.lengths[r], 1
        return buf

    def decode(self, rows: list[int], tokens: list[int]) -> torch.Tensor:
        """One decode step of cache rows `rows` fed `tokens`; returns their logits [n, V] (float32)."""
        cache = self.cache
        if any(cache.lengths[r] + 1 > self.scratch for r in rows):
            raise ValueError(f"a row would reach the cache's scratch slot {self.scratch}; the DecodeBatch "
                             f"checks lengths before this (a bug if seen)")
        b = bucket_for(max(rows) + 1, self.buckets)
        graph, inputs, logits = self.graphs.get(b) or self._build(b)
        inputs.copy_(self.host_inputs(rows, tokens, b), non_blocking=True)
        if graph is None:
            logits.copy_(self._body(b, inputs))
        else:
            graph.replay()
            self.replays += 1
        for r in rows:
            cache.lengths[r] += 1
            cache.next_pos[r] += 1
        cache.dense = False
        return logits[torch.tensor(rows, device=logits.device)]

    @torch.no_grad()
    def capture_all(self) -> None:
        """Capture every bucket now (a server at start-up) instead of at first use."""
        for b in self.buckets:
            if b not in self.graphs:
                self._build(b)

    # ---------------------------------------------------------------- device side
    def _body(self, b: int, inputs: torch.Tensor) -> torch.Tensor:
        """The static decode step of rows 0 .. b-1; every shape depends on b only. Returns [b, V]."""
        m, cache = self.model, self.cache
        tok_b, pos_b, slot_b, active_b = inputs[0], inputs[1], inputs[2], inputs[3].bool()
        K, Hk, dev = cache.max_len, cache.k.shape[2], inputs.device
        row_b = torch.arange(b, device=dev)
        # validity of the new slots (inactive rows clear their scratch slot: never a key of anyone)
        cache.valid_BS[:b].view(-1).index_copy_(0, row_b * K + slot_b, active_b)
        # what the eager path's general mask says: real keys at or before the row's slot, and its own
        # slot (keys past it may be a chunked prefill's scratch, marked valid)
        keys_K = torch.arange(K, device=dev)
        own_bK = keys_K[None, :] == slot_b[:, None]
        mask_b11K = ((cache.valid_BS[:b] & (keys_K[None, :] <= slot_b[:, None])) | own_bK)[:, None, None, :]
        heads_bHk = row_b[:, None] * Hk + torch.arange(Hk, device=dev)
        write_index = (heads_bHk * K + slot_b[:, None]).reshape(-1)
        # slots_BS: the aligned path writes through write_index; the query slots are what sliding-window
        # attention (gpt-oss) needs to place each row's window
        batch = AttentionBatch(rows_B=None, slots_BS=slot_b[:, None], mask_B1SK=mask_b11K, keys=K,
                               row_span=slice(0, b),
                               write_index=write_index)
        pos_b = pos_b.clamp(max=m.cfg.max_seq_len - 1)
        cos, sin = m.rope_cos[pos_b][:, None], m.rope_sin[pos_b][:, None]  # [b, 1, Dh/2]: per-row positions
        return m._run_blocks(m.embed(tok_b[:, None]), cos, sin, cache, batch, -1).logits[:, -1]

    @torch.no_grad()
    def _build(self, b: int):
        """Static buffers for bucket b and, with capture, its graph (warm-up on a side stream first)."""
        dev = self.cache.k.device
        inputs = torch.zeros(4, b, dtype=torch.long, device=dev)
        inputs[2].fill_(self.scratch)  # all rows inactive while warming up: only scratch slots are written
        if not self.capture:
            logits = self._body(b, inputs)
            self.graphs[b] = (None, inputs, torch.empty_like(logits))
            return self.graphs[b]
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._body(b, inputs)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._body(b, inputs)
        self.graphs[b] = (graph, inputs, logits)
        return self.graphs[b]


__all__ = ["GraphDecoder", "graph_buckets", "bucket_for", "check_graph_device", "CUDA_GRAPHS_NEED_CUDA"]
