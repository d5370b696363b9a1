"""The model side of `moe serve`: what the scheduler needs from a generation engine.

Legend: B live rows, V vocab.

A Backend holds one KV-cache row per live sequence: `add` prefills a prompt into a new row and
returns its first token, `step` decodes one token for every live row, `remove` frees a row.
`cache_stats(engine)` reads the expert cache's cumulative statistics for /metrics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass(kw_only=True)
class SamplingParams:
    temperature: float = 0.0
    """0 = greedy."""
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    """Token ids that end the answer (EOS and the like); they are not part of it."""


class Backend(Protocol):
    max_seq_len: int

    def add(self, sid: int, prompt_ids: list[int], params: SamplingParams) -> int: ...

    def step(self) -> dict[int, int]: ...

    def remove(self, sid: int) -> None: ...


def cache_stats(engine: Any) -> dict[str, float]:
    """Cumulative expert-cache figures of an ExpertCacheEngine, named as /metrics shows them."""
    rt, cp = engine.runtime, engine.copies
    c = rt.c
    pred = rt.pred_stats.summary()
    out = {"expert_uses_total": c.expert_uses, "expert_cache_hits_total": c.hits,
           "expert_bytes_moved_total": cp.bytes_moved, "expert_stall_seconds_total": float(cp.stall_s),
           "expert_copies_total": cp.copies, "stream_steps_total": c.stream_steps,
           "cache_steps_total": c.cache_steps}
    if c.expert_uses:
        out["expert_cache_hit_rate"] = c.hits / c.expert_uses
    for key in ("precision", "recall"):
        if pred.get(key) is not None:
            out[f"prefetch_{key}"] = float(pred[key])
    return out


class RowBackend:
    """Each sequence in its own batch-1 KV cache, one forward per row per step (no shared batch)."""

    def __init__(self, engine: Any):
        from moe.model import KVCache
        self.engine, self._KVCache = engine, KVCache
        self.max_seq_len = engine.model.cfg.max_seq_len
        self.rows: dict[int, tuple[Any, torch.Tensor, SamplingParams, torch.Generator | None, list[int]]] = {}

    @torch.no_grad()
    def add(self, sid: int, prompt_ids: list[int], params: SamplingParams) -> int:
        m = self.engine.model
        cache = self._KVCache.empty(m.cfg, 1, self.max_seq_len, self.engine.device, m.embed.weight.dtype)
        logits = self.engine.forward(torch.tensor([prompt_ids]), cache).logits[0, -1]
        gen = torch.Generator(device=self.engine.device).manual_seed(params.seed or 0) if params.temperature else None
        seen = list(prompt_ids)
        self.rows[sid] = (cache, logits, params, gen, seen)
        return self._sample(sid)

    def _sample(self, sid: int) -> int:
        cache, logits, p, gen, seen = self.rows[sid]
        tok = int(sample_row(logits, p, gen, seen))  # host sync: the scheduler needs the token
        seen.append(tok)
        return tok

    @torch.no_grad()
    def step(self) -> dict[int, int]:
        out = {}
        for sid, (cache, _, p, gen, seen) in list(self.rows.items()):
            logits = self.engine.forward(torch.tensor([[seen[-1]]]), cache).logits[0, -1]
            self.rows[sid] = (cache, logits, p, gen, seen)
            out[sid] = self._sample(sid)
        return out

    def remove(self, sid: int) -> None:
        self.rows.pop(sid, None)


def sample_row(logits_V: torch.Tensor, p: SamplingParams, gen: torch.Generator | None, seen: list[int]) -> torch.Tensor:
    """Repetition penalty, then greedy or temperature / top-k / top-p sampling of one token."""
    logits_V = logits_V.float()
    if p.repetition_penalty != 1.0 and seen:
        idx = torch.tensor(sorted(set(seen)), device=logits_V.device)
        v = logits_V[idx]
        logits_V = logits_V.index_put((idx,), torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty))
    if p.temperature <= 0:
        return logits_V.argmax()
    logits_V = logits_V / p.temperature
    if p.top_k is not None:
        kth = logits_V.topk(min(p.top_k, logits_V.shape[-1])).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_V, order = logits_V.sort(descending=True)
        drop = sorted_V.softmax(-1).cumsum(-1) - sorted_V.softmax(-1) >= p.top_p
        logits_V = logits_V.scatter(0, order, sorted_V.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits_V.softmax(-1), 1, generator=gen)[0]


__all__ = ["SamplingParams", "Backend", "RowBackend", "cache_stats"]
