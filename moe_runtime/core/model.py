"""MoETransformer: a decoder-only language model whose FFNs are mixtures of experts.

Legend: B batch, S sequence, T = B*S tokens, D model dim, H heads, Hk key/value heads,
Dh head dim, V vocab, E experts, K top-k.

Reads top to bottom like the paper: embed -> [RMSNorm -> rotary attention -> RMSNorm -> MoE FFN] x L
-> RMSNorm -> logits. With router_position="pre_attention" each block routes from its input
before attention runs, so an inference engine knows the layer's experts while attention computes.
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moe_runtime.core.attention_variants import model_rotary_tables, rotary_tables, variant_attention  # noqa: F401
from moe_runtime.core.config import ModelConfig
from moe_runtime.core.experts import SwiGLUMLP
from moe_runtime.core.layer import MoELayer, out_proj_std
from moe_runtime.core.router import RouterOutput


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # no casts: 2 fewer ops a call
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def apply_rotary(x_BHSDh: torch.Tensor, cos_SDh2: torch.Tensor, sin_SDh2: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding (the Llama / Mixtral / Qwen convention). The tables are
    [S, Dh/2] (every row at the same positions) or [B, S, Dh/2] (per-row positions)."""
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    cos, sin = (cos_SDh2[None, None], sin_SDh2[None, None]) if cos_SDh2.dim() == 2 else (cos_SDh2[:, None], sin_SDh2[:, None])
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BHSDh.dtype)


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: [L, B, Hk, S_max, Dh] each, with per-row state.

    Row b has used `lengths[b]` slots (left padding included) and its next token sits at rotary
    position `next_pos[b]` (real tokens only); `valid_BS` marks the slots that hold real tokens.
    Rows advance independently, so one cache can hold sequences at different positions: a new
    sequence joins by `reset_row(b)` then a forward with `cache_rows=[b]` (prefill of that row),
    and a finished one leaves by `reset_row(b)`. Host-side bookkeeping is plain ints (no sync)."""

    k: torch.Tensor
    v: torch.Tensor
    lengths: list[int] = field(default_factory=list)
    next_pos: list[int] = field(default_factory=list)
    valid_BS: torch.Tensor | None = None
    dense: bool = True
    """True while every row holds the same number of real tokens and no padding (the fast path)."""

    def __post_init__(self) -> None:
        B, S_max = self.k.shape[1], self.k.shape[3]
        self.lengths = self.lengths or [0] * B
        self.next_pos = self.next_pos or list(self.lengths)
        if self.valid_BS is None:
            self.valid_BS = torch.zeros(B, S_max, dtype=torch.bool, device=self.k.device)
            for b, n in enumerate(self.lengths):
                self.valid_BS[b, :n] = True

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def length(self) -> int:
        """Slots used by the longest row (all rows, when they advance together)."""
        return max(self.lengths) if self.lengths else 0

    def reset_row(self, b: int) -> None:
        """Free row b (a finished sequence) or clear it for a new one; other rows are untouched."""
        if not 0 <= b < self.batch:
            raise ValueError(f"row {b} is outside this cache's {self.batch} rows")
        self.lengths[b] = self.next_pos[b] = 0
        self.valid_BS[b] = False
        self.dense = False


@dataclass
class AttentionBatch:
    """Where one forward pass's tokens go in the cache and what each query may see; built once
    per pass by MoETransformer and shared by every layer (the masked / per-row path)."""

    rows_B: torch.Tensor | None
    """Cache rows of the batch rows (device), or None for all rows in order."""
    slots_BS: torch.Tensor | None
    """Cache slot each new token is written to (device); None when `write_at` says it."""
    mask_B1SK: torch.Tensor | None
    """Key visibility: real keys at or before the query's slot, and the query's own slot
    (None: every key read is visible, a decode step of rows at the same length)."""
    keys: int
    """K: slots read (the longest row's length after this pass)."""
    row_span: slice | None = None
    """The aligned path: the batch rows are these consecutive cache rows and none holds padding,
    so keys and values are read through a view (no per-row gather)."""
    write_at: int | None = None
    """With row_span: every row writes its new tokens at slots write_at .. write_at+S-1."""
    write_index: torch.Tensor | None = None
    """With row_span and no write_at: [B*Hk*S] rows of a layer's cache rows viewed as [B*Hk*S_max, Dh]
    that the new keys/values (in [B, Hk, S] order) go to."""


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, out_std: float, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        D = cfg.d_model
        self.wq = nn.Linear(D, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, D, bias=cfg.o_bias)
        if self.wo.bias is not None:
            nn.init.zeros_(self.wo.bias)
        # gpt-oss (core/attention_variants.py): this layer's sliding window and per-head sink logits
        self.window = cfg.window_of(layer)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if cfg.attn_sinks else None
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=cfg.init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        nn.init.normal_(self.wo.weight, std=out_std)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else self.n_heads * self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per_head else self.n_kv * self.head_dim, cfg.norm_eps)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0, batch: AttentionBatch | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k, v = self._qkv(x_BSD, cos, sin)
        if batch is not None:
            o = self._attend_masked(q, k, v, cache, layer, batch)
            return self.wo(o.transpose(1, 2).reshape(B, S, -1))
        start = 0
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + S] = k
            cache.v[layer, :, :, start:start + S] = v
            k, v = cache.k[layer, :, :, :start + S], cache.v[layer, :, :, :start + S]
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        if self.window is not None or self.sinks is not None:
            o = variant_attention(q, k.to(q.dtype), v.to(q.dtype), None, start, True, self.window, self.sinks)
        elif start == 0:
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=S > 1)
        else:
            # Decoding after a prefix: query i sees keys 0 .. start+i.
            mask = torch.ones(S, start + S, dtype=torch.bool, device=q.device).tril(diagonal=start)
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))

    def _qkv(self, x_BSD: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q [B, H, S, Dh], k and v [B, Hk, S, Dh]. CPU inference (no gradient, no qk-norm):
        one GEMM with the three weights stacked and the rotary on a view of its output, 4 ops
        fewer per layer (a decode step of a small model is per-op overhead); elementwise the same
        values as the three projections."""
        B, S, _ = x_BSD.shape
        H, Hk, Dh = self.n_heads, self.n_kv, self.head_dim
        if self.qk_norm is None and x_BSD.device.type == "cpu" and not torch.is_grad_enabled():
            w, b = self._stacked_qkv()
            qkv = F.linear(x_BSD, w, b).view(B, S, H + 2 * Hk, Dh).transpose(1, 2)
            q, k = apply_rotary(qkv[:, :H + Hk], cos, sin).split([H, Hk], dim=1)
            return q, k, qkv[:, H + Hk:]
        q, k = self.wq(x_BSD), self.wk(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, S, H, Dh), k.view(B, S, Hk, Dh)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, Hk, Dh).transpose(1, 2)
        # one rotary call for q and k together (elementwise: the same values, half the ops)
        q, k = apply_rotary(torch.cat([q, k], dim=1), cos, sin).split([H, Hk], dim=1)
        return q, k, v

    def _stacked_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[wq; wk; wv] (and biases) as one matrix, rebuilt when a weight is replaced, moved or
        changed in place (its version counter); a copy of the attention weights in host memory."""
        lins = (self.wq, self.wk, self.wv)
        ts = [l.weight for l in lins] + ([l.bias for l in lins] if self.wq.bias is not None else [])
        # inference tensors (made under torch.inference_mode) keep no version counter: their address only
        key = tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in ts)
        got = self.__dict__.get("_qkv_stack")
        if got is None or got[0] != key:
            bias = torch.cat([l.bias for l in lins]) if self.wq.bias is not None else None
            got = self.__dict__["_qkv_stack"] = (key, torch.cat([l.weight for l in lins]), bias)
        return got[1], got[2]

    def _repeat_kv(self, x_BHkSDh: torch.Tensor) -> torch.Tensor:
        return x_BHkSDh if self.n_kv == self.n_heads else x_BHkSDh.repeat_interleave(self.n_heads // self.n_kv, dim=1)

    def _attend_masked(self, q, k, v, cache: KVCache | None, layer: int, batch: AttentionBatch) -> torch.Tensor:
        """Per-row slots and masks: padded prompts, rows at different positions, a subset of rows."""
        if cache is not None and batch.row_span is not None:  # aligned rows: views, no gather
            kl, vl = cache.k[layer, batch.row_span], cache.v[layer, batch.row_span]
            if batch.write_at is not None:
                w, S = batch.write_at, q.shape[2]
                kl[:, :, w:w + S] = k.to(kl.dtype)
                vl[:, :, w:w + S] = v.to(vl.dtype)
            else:  # rows at different lengths: one flat index, built once per pass (index_copy_, no index_put)
                Dh = kl.shape[-1]
                kl.view(-1, Dh).index_copy_(0, batch.write_index, k.reshape(-1, Dh).to(kl.dtype))
                vl.view(-1, Dh).index_copy_(0, batch.write_index, v.reshape(-1, Dh).to(vl.dtype))
            k, v = kl[:, :, :batch.keys], vl[:, :, :batch.keys]
        elif cache is not None:
            kl, vl = cache.k[layer], cache.v[layer]
            rows = batch.rows_B if batch.rows_B is not None else torch.arange(q.shape[0], device=q.device)
            kl[rows[:, None], :, batch.slots_BS] = k.transpose(1, 2).to(kl.dtype)
            vl[rows[:, None], :, batch.slots_BS] = v.transpose(1, 2).to(vl.dtype)
            if batch.rows_B is None:
                k, v = kl[:, :, :batch.keys], vl[:, :, :batch.keys]
            else:
                k, v = kl[batch.rows_B, :, :batch.keys], vl[batch.rows_B, :, :batch.keys]
        k, v = self._repeat_kv(k), self._repeat_kv(v)
        if self.window is not None or self.sinks is not None:
            slots = batch.slots_BS if batch.slots_BS is not None else batch.write_at
            return variant_attention(q, k.to(q.dtype), v.to(q.dtype), batch.mask_B1SK, slots, False, self.window,
                                     self.sinks)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=batch.mask_B1SK)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        out_std = out_proj_std(cfg.init_std, cfg.n_layers)
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, out_std, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.pre_attention_router = self.is_moe and cfg.moe.router_position == "pre_attention"
        if self.is_moe:
            self.ffn = MoELayer(cfg.d_model, cfg.moe, init_std=cfg.init_std, out_std=out_std)
        else:
            self.ffn = SwiGLUMLP(cfg.d_model, cfg.d_dense_ffn, init_std=cfg.init_std, out_std=out_std)

    def forward(self, h_BSD: torch.Tensor, cos, sin, cache: KVCache | None = None,
                batch: AttentionBatch | None = None) -> tuple[torch.Tensor, RouterOutput | None]:
        B, S, D = h_BSD.shape
        a_BSD = self.attn_norm(h_BSD)
        routing = self.ffn.route(a_BSD.reshape(B * S, D)) if self.pre_attention_router else None
        h_BSD = h_BSD + self._attend(a_BSD, cos, sin, cache, batch)
        f_TD = self.ffn_norm(h_BSD).reshape(B * S, D)
        if not self.is_moe:
            return h_BSD + self.ffn(f_TD).view(B, S, D), None
        y_TD, routing = self.ffn(f_TD, routing)
        return h_BSD + y_TD.view(B, S, D), routing

    checkpoint_attention = False
    """Selective activation checkpointing: recompute attention in backward (set by MoETransformer)."""

    def _attend(self, a_BSD: torch.Tensor, cos, sin, cache: KVCache | None, batch) -> torch.Tensor:
        if self.checkpoint_attention and cache is None and batch is None and self.training \
                and torch.is_grad_enabled():
            return checkpoint(self.attn, a_BSD, cos, sin, use_reentrant=False, context_fn=_recompute_contexts)
        return self.attn(a_BSD, cos, sin, cache, self.layer, batch)


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """[B, S, V] float32."""
    routing: list[RouterOutput] = field(default_factory=list)
    """One RouterOutput per MoE layer, in layer order."""


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        else:
            nn.init.normal_(self.head.weight, std=cfg.init_std)
        cos, sin = model_rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    activation_checkpointing = "none"
    """'none' | 'full' | 'selective' (TrainConfig.activation_checkpointing; set by the Trainer)."""

    def set_activation_checkpointing(self, mode: str) -> None:
        self.activation_checkpointing = mode
        for b in self.blocks:
            b.checkpoint_attention = mode == "selective"

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, tokens_BS: torch.Tensor, cache: KVCache | None = None, *,
                attention_mask_BS: torch.Tensor | None = None, positions_BS: torch.Tensor | None = None,
                cache_rows: list[int] | None = None, last_logits_only: bool = False,
                new_tokens: list[int] | None = None) -> ModelOutput:
        """Logits for tokens_BS, appending to `cache` when given.

        attention_mask_BS: 1 for real tokens, 0 for padding, over the NEW tokens only (the cache
        remembers which of its slots are real); left padding is the usual layout. positions_BS:
        rotary positions (default: each row continues from its cache position, counting real
        tokens only). cache_rows: the cache rows the batch rows are (default: all, in order), so
        one row can be prefilled while the others wait. Without any of these and with a dense
        cache, the plain path runs (identical to before). last_logits_only: logits [B, 1, V] of the
        last position only (a prefill's [B, S, V] would be S times the memory).

        new_tokens: right padding (chunked prefill of several rows in one pass): row b's first
        new_tokens[b] tokens are real and advance the row; the rest are scratch written past the
        row's end (the cache needs those slots) and never seen by a real token. With
        last_logits_only, the logits are those of each row's last real token. Needs a cache whose
        rows hold no padding, and no mask or positions."""
        B, S = tokens_BS.shape
        if cache is not None and cache_rows is None and B != cache.batch:
            raise ValueError(f"a batch of {B} rows for a KV cache of {cache.batch} rows; pass cache_rows= naming "
                             f"the cache rows these are")
        if new_tokens is None and attention_mask_BS is None and positions_BS is None and cache_rows is None \
                and (cache is None or cache.dense):
            return self._forward_dense(tokens_BS, cache, last_logits_only)
        unpadded = self._unpadded_batch(tokens_BS, cache, attention_mask_BS, positions_BS, cache_rows, new_tokens)
        if unpadded is not None:
            batch, cos, sin = unpadded
            last = None
            if last_logits_only:
                last = -1 if new_tokens is None else torch.tensor([n - 1 for n in new_tokens], device=tokens_BS.device)
            return self._run_blocks(self.embed(tokens_BS), cos, sin, cache, batch, last)
        if new_tokens is not None:
            raise ValueError("new_tokens (right padding) needs a KV cache whose rows hold no padding, and no "
                             "attention_mask_BS or positions_BS")
        batch, positions_BS = self._attention_batch(tokens_BS, cache, attention_mask_BS, positions_BS, cache_rows)
        cos, sin = self.rope_cos[positions_BS], self.rope_sin[positions_BS]
        return self._run_blocks(self.embed(tokens_BS), cos, sin, cache, batch, -1 if last_logits_only else None)

    def _forward_dense(self, tokens_BS: torch.Tensor, cache: KVCache | None, last_only: bool) -> ModelOutput:
        S = tokens_BS.shape[1]
        start = cache.length if cache is not None else 0
        if start + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + S} tokens exceeds max_seq_len={self.cfg.max_seq_len}; "
                             f"shorten the input or raise max_seq_len")
        if cache is not None and start + S > cache.max_len:
            raise ValueError(f"{start + S} tokens do not fit the KV cache's {cache.max_len} slots; allocate a larger cache")
        cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        out = self._run_blocks(self.embed(tokens_BS), cos, sin, cache, None, -1 if last_only else None)
        if cache is not None:
            cache.valid_BS[:, start:start + S] = True
            cache.lengths = [n + S for n in cache.lengths]
            cache.next_pos = [n + S for n in cache.next_pos]
        return out

    def _run_blocks(self, h, cos, sin, cache, batch, last: int | torch.Tensor | None = None) -> ModelOutput:
        """last: None (every position's logits), -1 (the last position's) or a [B] tensor (row b's
        logits at position last[b])."""
        routing: list[RouterOutput] = []
        full_ckpt = self.activation_checkpointing == "full" and cache is None and batch is None and self.training \
            and torch.is_grad_enabled()
        for block in self.blocks:
            if full_ckpt:  # recompute the whole block (routing included) in backward
                h, r = checkpoint(block, h, cos, sin, use_reentrant=False, context_fn=_recompute_contexts)
            else:
                h, r = block(h, cos, sin, cache, batch)
            if r is not None:
                routing.append(r)
        if isinstance(last, torch.Tensor):
            h = h[torch.arange(h.shape[0], device=h.device), last][:, None]
        elif last is not None:
            h = h[:, -1:]
        return ModelOutput(self.head(self.norm(h)).float(), routing)

    def _unpadded_batch(self, tokens_BS, cache, mask_BS, positions_BS, cache_rows, new_tokens):
        """The path of rows without padding, or None (then the general path runs): no mask, default
        positions, and no batch row holds padding in the cache, so a row's slots are its positions
        and its keys are the slots before the query's. The key mask is built once for the pass:
        none at all for rows at the same length decoding one token, a shared causal mask for rows
        at the same length, else one comparison. Consecutive ascending cache rows are read through
        a view of the cache (no per-row gather); other row sets gather."""
        if cache is None or mask_BS is not None or positions_BS is not None:
            return None
        B, S = tokens_BS.shape
        rows = list(range(B)) if cache_rows is None else [int(r) for r in cache_rows]
        if len(rows) != B or not rows or len(set(rows)) != B or not all(0 <= r < cache.batch for r in rows):
            return None  # the general path checks (and explains) bad rows
        used = [cache.lengths[r] for r in rows]
        if used != [cache.next_pos[r] for r in rows]:
            return None  # a row holds padding (slots counted that are not positions)
        real = [S] * B if new_tokens is None else [int(n) for n in new_tokens]
        if len(real) != B or not all(1 <= n <= S for n in real):
            raise ValueError(f"new_tokens={new_tokens} must give each of the {B} rows 1..{S} real tokens")
        top = max(used) + S
        if top > cache.max_len:
            raise ValueError(f"{top} slots do not fit the KV cache's {cache.max_len}; allocate a larger cache")
        self._check_positions(max(u + n for u, n in zip(used, real)))
        dev = tokens_BS.device
        contiguous = rows == list(range(rows[0], rows[0] + B))
        span = slice(rows[0], rows[0] + B) if contiguous else None
        rows_t = None if contiguous else torch.tensor(rows, device=dev)
        write_index = None
        if min(used) == top - S:  # every row at the same length: one slot range, one causal mask
            u = top - S
            mask = None if S == 1 else self._causal_mask(S, top, u, dev)
            if contiguous:
                cache.valid_BS[span, u:top] = True
            else:
                cache.valid_BS[rows_t, u:top] = True
            hi = min(top, self.cfg.max_seq_len)  # scratch tokens past the model's context reuse the last angle
            cos, sin = self.rope_cos[u:hi], self.rope_sin[u:hi]
            if hi < top:
                cos = torch.cat([cos, cos[-1:].expand(top - hi, -1)])
                sin = torch.cat([sin, sin[-1:].expand(top - hi, -1)])
            slots_BS = None if contiguous else torch.arange(u, top, device=dev).expand(B, S)
            write_at = u if contiguous else None
        else:
            slots_BS = torch.tensor(used, device=dev)[:, None] + torch.arange(S, device=dev)
            seen = torch.arange(top, device=dev)[None, None, None, :] <= slots_BS[:, None, :, None]
            # additive, in the activations' dtype: SDPA would turn a bool mask into this in every layer
            mask = torch.zeros(seen.shape, dtype=self.embed.weight.dtype, device=dev).masked_fill_(~seen, float("-inf"))
            rows_col = (torch.arange(rows[0], rows[0] + B, device=dev) if contiguous else rows_t)[:, None]
            cache.valid_BS[rows_col, slots_BS] = True
            if contiguous:
                Hk = cache.k.shape[2]
                heads_BHk = torch.arange(B, device=dev)[:, None] * Hk + torch.arange(Hk, device=dev)
                write_index = (heads_BHk[:, :, None] * cache.max_len + slots_BS[:, None, :]).reshape(-1)
            pos_BS = slots_BS.clamp(max=self.cfg.max_seq_len - 1)
            cos, sin = self.rope_cos[pos_BS], self.rope_sin[pos_BS]
            write_at = None
        for r, n in zip(rows, real):
            cache.lengths[r] += n
            cache.next_pos[r] += n
        cache.dense = False
        batch = AttentionBatch(rows_B=rows_t, slots_BS=slots_BS, mask_B1SK=mask, keys=top, row_span=span,
                               write_at=write_at, write_index=write_index)
        return batch, cos, sin

    def _causal_mask(self, S: int, K: int, start: int, dev) -> torch.Tensor:
        """[S, K] bool: query i (at slot start+i) sees keys 0 .. start+i; cached per shape."""
        key = (S, K, start, str(dev))
        m = self._mask_cache.get(key)
        if m is None:
            if len(self._mask_cache) > 64:
                self._mask_cache.clear()
            m = self._mask_cache[key] = torch.ones(S, K, dtype=torch.bool, device=dev).tril(diagonal=start)
        return m

    def _attention_batch(self, tokens_BS, cache, mask_BS, positions_BS, cache_rows
                         ) -> tuple[AttentionBatch, torch.Tensor]:
        """1. check the rows and the mask, 2. positions (from the cache's per-row counters),
        3. slots each new token takes, 4. the key mask, 5. advance the cache's counters."""
        B, S = tokens_BS.shape
        dev = tokens_BS.device
        rows = list(range(B)) if cache_rows is None else [int(r) for r in cache_rows]
        if cache is not None:
            if len(rows) != B or len(set(rows)) != B or not all(0 <= r < cache.batch for r in rows):
                raise ValueError(f"cache_rows={cache_rows} must name {B} distinct rows of the cache's {cache.batch}")
        elif cache_rows is not None:
            raise ValueError("cache_rows needs a cache")
        all_real, given_positions = mask_BS is None, positions_BS is not None
        if mask_BS is None:
            mask_BS = torch.ones(B, S, dtype=torch.bool, device=dev)
        elif mask_BS.shape != (B, S):
            raise ValueError(f"attention_mask_BS has shape {tuple(mask_BS.shape)}; expected {(B, S)} (the new tokens)")
        mask_BS = mask_BS.to(device=dev, dtype=torch.bool)
        past = [cache.next_pos[r] for r in rows] if cache is not None else [0] * B
        if positions_BS is None:
            positions_BS = torch.tensor(past, device=dev)[:, None] + (mask_BS.long().cumsum(1) - 1).clamp(min=0)
        used = [cache.lengths[r] for r in rows] if cache is not None else [0] * B
        top = max(used) + S
        if cache is not None and top > cache.max_len:
            raise ValueError(f"{top} slots do not fit the KV cache's {cache.max_len}; allocate a larger cache")
        slots_BS = torch.tensor(used, device=dev)[:, None] + torch.arange(S, device=dev)
        if cache is not None:
            rows_t = torch.tensor(rows, device=dev)
            cache.valid_BS[rows_t[:, None], slots_BS] = mask_BS
            valid_BK = cache.valid_BS[rows_t, :top]
        else:
            valid_BK = mask_BS
        keys_K = torch.arange(top, device=dev)
        seen_BSK = (valid_BK[:, None, :] & (keys_K[None, None, :] <= slots_BS[:, :, None])) | (
            keys_K[None, None, :] == slots_BS[:, :, None])  # a padding query sees itself: no empty softmax
        real = [S] * B if all_real else mask_BS.sum(1).tolist()  # host sync: per-row counters live on the host
        if given_positions:
            self._check_positions(positions_BS)
        else:
            self._check_positions(max(p + n for p, n in zip(past, real)))
        if cache is not None:
            for i, r in enumerate(rows):
                cache.lengths[r] += S
                cache.next_pos[r] += int(real[i])
            cache.dense = False
        batch = AttentionBatch(rows_B=None if cache_rows is None else rows_t, slots_BS=slots_BS,
                               mask_B1SK=seen_BSK[:, None], keys=top)
        return batch, positions_BS

    def _check_positions(self, positions: torch.Tensor | int) -> None:
        """positions: the rotary positions used, or already the number of positions needed."""
        if isinstance(positions, torch.Tensor):
            positions = int(positions.max()) + 1 if positions.numel() else 0  # host sync: a bound check
        if positions > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {positions} tokens exceeds max_seq_len={self.cfg.max_seq_len}; "
                             f"shorten the input or raise max_seq_len")

    @torch.no_grad()
    def generate(self, prompt_BS: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation with a KV cache. Returns [B, new]."""
        B, S = prompt_BS.shape
        cache = KVCache.empty(self.cfg, B, S + max_new_tokens, prompt_BS.device, self.embed.weight.dtype)
        logits = self(prompt_BS, cache).logits[:, -1]
        out = []
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self(nxt[:, None], cache).logits[:, -1]
        return torch.stack(out, dim=1) if out else prompt_BS.new_zeros(B, 0)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0, else temperature (+ optional top-k) sampling."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV / temperature
    if top_k is not None:
        kth = logits_BV.topk(min(top_k, logits_BV.shape[-1]), dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------- activation checkpointing
_recompute_depth = 0


@contextlib.contextmanager
def _recomputing():
    global _recompute_depth
    _recompute_depth += 1
    try:
        yield
    finally:
        _recompute_depth -= 1


def _recompute_contexts():
    """torch.utils.checkpoint context_fn: plain forward, then a recompute that is_recomputing() sees."""
    return contextlib.nullcontext(), _recomputing()


def is_recomputing() -> bool:
    """True while activation checkpointing recomputes a forward in backward: code with side effects
    (load counters) must not count it again. Routing counts are safe: BalanceTracker only sees the
    first forward's RouterOutput, so the exact global-batch counts never include a recompute."""
    return _recompute_depth > 0


# ---------------------------------------------------------------------- layout-free initialisation
def init_model(cfg: ModelConfig, *, seed: int, device: str | torch.device = "cpu",
               expert_rows: slice | None = None) -> MoETransformer:
    """A model whose initial weights depend only on (seed, parameter name) and, for routed experts,
    on (seed, layer, expert): built on the meta device, then only what this process keeps is
    materialised. expert_rows: keep only these experts of every MoE layer (an expert-parallel
    rank's shard); their weights equal the same rows of the full model's, bit for bit.
    """
    with torch.device("meta"):
        model = MoETransformer(cfg)
        if expert_rows is not None:
            from moe_runtime.core.experts import ExpertBank
            for layer in model.moe_layers():
                full = layer.experts
                layer.experts = ExpertBank(expert_rows.stop - expert_rows.start, full.d_model, full.d_expert,
                                           expert_offset=expert_rows.start, bias=full.b13_EF2 is not None,
                                           act=full.act)
    model.to_empty(device=device)
    out_std = out_proj_std(cfg.init_std, cfg.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _init_param(model, name, p, seed, cfg.init_std, out_std)
        for name, b in model.named_buffers():
            if name.endswith("bias_E"):
                b.zero_()
        model.rope_cos, model.rope_sin = (t.to(device) for t in model_rotary_tables(cfg))
    return model


_OUT_PROJ = ("attn.wo.weight", ".w2.weight", "experts.w2_EFD")


def _init_param(model: MoETransformer, name: str, p: torch.Tensor, seed: int, std: float, out_std: float) -> None:
    """The same distributions as the constructors (normal, zeros for biases, ones for norms),
    drawn on the CPU from a generator seeded by the name (or the expert), then copied over."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name.rsplit(".", 2)[-2] or leaf in ("bias", "b13_EF2", "b2_ED", "sinks", "logit_bias_E"):
        p.fill_(1.0 if leaf == "weight" else 0.0)
        return
    s = out_std if any(k in name for k in _OUT_PROJ) else std
    if "experts." in name and name.endswith(("w13_EDF2", "w2_EFD")):
        layer = int(name.split(".")[1])
        bank = model.blocks[layer].ffn.experts
        for i in range(p.shape[0]):
            e = bank.expert_offset + i
            g = torch.Generator().manual_seed(_mix(seed, layer, e, 1 if name.endswith("w2_EFD") else 0))
            p[i].copy_(torch.randn(p.shape[1:], generator=g) * s)
        return
    g = torch.Generator().manual_seed(_mix(seed, zlib.crc32(name.encode())))
    p.copy_(torch.randn(p.shape, generator=g) * s)


def _mix(*xs: int) -> int:
    """FNV-style mix of small integers into a 61-bit seed."""
    h = 1469598103934665603
    for x in xs:
        h = ((h ^ (x & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h
