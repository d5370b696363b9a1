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


class BatchBackend:
    """One KV cache of `rows` rows over the engine's model: a sequence owns a row from `add` to
    `remove`; `step` runs ONE forward pass for every live row (its last token each), so the
    expert cache sees the whole batch. Rows sit at different positions (moe.model's per-row cache)."""

    def __init__(self, engine: Any, rows: int, max_seq_len: int | None = None):
        from moe.model import KVCache
        m = engine.model
        self.engine, self.device = engine, engine.device
        self.max_seq_len = min(max_seq_len or m.cfg.max_seq_len, m.cfg.max_seq_len)
        self.cache = KVCache.empty(m.cfg, rows, self.max_seq_len, self.device, m.embed.weight.dtype)
        self.free = list(range(rows))
        self.live: dict[int, _Row] = {}

    @torch.no_grad()
    def add(self, sid: int, prompt_ids: list[int], params: SamplingParams) -> int:
        if not self.free:
            raise RuntimeError(f"all {self.cache.batch} KV-cache rows are taken; the scheduler admitted too many")
        if len(prompt_ids) >= self.max_seq_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.max_seq_len}")
        row = self.free.pop(0)
        self.cache.reset_row(row)
        gen = None
        if params.temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(params.seed or 0)
        r = self.live[sid] = _Row(row=row, params=params, gen=gen, seen=list(prompt_ids))
        tokens = torch.tensor([prompt_ids], device=self.device)
        logits_V = self.engine.model(tokens, self.cache, cache_rows=[row]).logits[0, -1]
        return r.take(int(sample_row(logits_V, params, gen, r.seen)))  # host sync: the token goes out

    @torch.no_grad()
    def step(self) -> dict[int, int]:
        sids = list(self.live)
        rows = [self.live[s].row for s in sids]
        last_B1 = torch.tensor([[self.live[s].seen[-1]] for s in sids], device=self.device)
        logits_BV = self.engine.model(last_B1, self.cache, cache_rows=rows).logits[:, -1]
        greedy = [i for i, s in enumerate(sids) if self.live[s].params.temperature <= 0
                  and self.live[s].params.repetition_penalty == 1.0]
        out = dict.fromkeys(sids, 0)
        if greedy:  # one argmax for every plain greedy row
            picks = logits_BV[greedy].argmax(-1).tolist()  # host sync: tokens go out each step
            for i, t in zip(greedy, picks):
                out[sids[i]] = t
        for i, s in enumerate(sids):
            if i not in greedy:
                r = self.live[s]
                out[s] = int(sample_row(logits_BV[i], r.params, r.gen, r.seen))  # host sync
        for s in sids:
            self.live[s].take(out[s])
        return out

    def remove(self, sid: int) -> None:
        r = self.live.pop(sid, None)
        if r is not None:
            self.cache.reset_row(r.row)
            self.free.append(r.row)


@dataclass(kw_only=True)
class _Row:
    row: int
    params: SamplingParams
    gen: torch.Generator | None
    seen: list[int]
    """Prompt and generated ids: the repetition penalty's history and the next step's input."""

    def take(self, token: int) -> int:
        self.seen.append(token)
        return token


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


__all__ = ["SamplingParams", "Backend", "BatchBackend", "sample_row", "cache_stats"]
