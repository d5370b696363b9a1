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

from moe.config import ModelConfig
from moe.experts import SwiGLUMLP
from moe.layer import MoELayer, out_proj_std
from moe.router import RouterOutput


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BHSDh: torch.Tensor, cos_SDh2: torch.Tensor, sin_SDh2: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding (the Llama / Mixtral / Qwen convention)."""
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    cos, sin = cos_SDh2[None, None], sin_SDh2[None, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BHSDh.dtype)


@dataclass
class KVCache:
    """Preallocated keys/values for every layer: [L, B, Hk, S_max, Dh] each."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype) -> "KVCache":
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, out_std: float):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        D = cfg.d_model
        self.wq = nn.Linear(D, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(D, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, D, bias=False)
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
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q, k = self.wq(x_BSD), self.wk(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.wv(x_BSD).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + S] = k
            cache.v[layer, :, :, start:start + S] = v
            k, v = cache.k[layer, :, :, :start + S], cache.v[layer, :, :, :start + S]
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if start == 0:
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=S > 1)
        else:
            # Decoding after a prefix: query i sees keys 0 .. start+i.
            mask = torch.ones(S, start + S, dtype=torch.bool, device=q.device).tril(diagonal=start)
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        out_std = out_proj_std(cfg.init_std, cfg.n_layers)
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, out_std)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.pre_attention_router = self.is_moe and cfg.moe.router_position == "pre_attention"
        if self.is_moe:
            self.ffn = MoELayer(cfg.d_model, cfg.moe, init_std=cfg.init_std, out_std=out_std)
        else:
            self.ffn = SwiGLUMLP(cfg.d_model, cfg.d_dense_ffn, init_std=cfg.init_std, out_std=out_std)

    def forward(self, h_BSD: torch.Tensor, cos, sin, cache: KVCache | None = None
                ) -> tuple[torch.Tensor, RouterOutput | None]:
        B, S, D = h_BSD.shape
        a_BSD = self.attn_norm(h_BSD)
        routing = self.ffn.route(a_BSD.reshape(B * S, D)) if self.pre_attention_router else None
        h_BSD = h_BSD + self._attend(a_BSD, cos, sin, cache)
        f_TD = self.ffn_norm(h_BSD).reshape(B * S, D)
        if not self.is_moe:
            return h_BSD + self.ffn(f_TD).view(B, S, D), None
        y_TD, routing = self.ffn(f_TD, routing)
        return h_BSD + y_TD.view(B, S, D), routing

    checkpoint_attention = False
    """Selective activation checkpointing: recompute attention in backward (set by MoETransformer)."""

    def _attend(self, a_BSD: torch.Tensor, cos, sin, cache: KVCache | None) -> torch.Tensor:
        if self.checkpoint_attention and cache is None and self.training and torch.is_grad_enabled():
            return checkpoint(self.attn, a_BSD, cos, sin, use_reentrant=False, context_fn=_recompute_contexts)
        return self.attn(a_BSD, cos, sin, cache, self.layer)


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
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    activation_checkpointing = "none"
    """'none' | 'full' | 'selective' (TrainConfig.activation_checkpointing; set by the Trainer)."""

    def set_activation_checkpointing(self, mode: str) -> None:
        self.activation_checkpointing = mode
        for b in self.blocks:
            b.checkpoint_attention = mode == "selective"

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def forward(self, tokens_BS: torch.Tensor, cache: KVCache | None = None) -> ModelOutput:
        B, S = tokens_BS.shape
        start = cache.length if cache is not None else 0
        if start + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + S} tokens exceeds max_seq_len={self.cfg.max_seq_len}; "
                             f"shorten the input or raise max_seq_len")
        cos, sin = self.rope_cos[start:start + S], self.rope_sin[start:start + S]
        h = self.embed(tokens_BS)
        routing: list[RouterOutput] = []
        full_ckpt = self.activation_checkpointing == "full" and cache is None and self.training \
            and torch.is_grad_enabled()
        for block in self.blocks:
            if full_ckpt:  # recompute the whole block (routing included) in backward
                h, r = checkpoint(block, h, cos, sin, use_reentrant=False, context_fn=_recompute_contexts)
            else:
                h, r = block(h, cos, sin, cache)
            if r is not None:
                routing.append(r)
        if cache is not None:
            cache.length += S
        return ModelOutput(self.head(self.norm(h)).float(), routing)

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
            from moe.experts import ExpertBank
            for layer in model.moe_layers():
                full = layer.experts
                layer.experts = ExpertBank(expert_rows.stop - expert_rows.start, full.d_model, full.d_expert,
                                           expert_offset=expert_rows.start)
    model.to_empty(device=device)
    out_std = out_proj_std(cfg.init_std, cfg.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            _init_param(model, name, p, seed, cfg.init_std, out_std)
        for name, b in model.named_buffers():
            if name.endswith("bias_E"):
                b.zero_()
        model.rope_cos, model.rope_sin = (t.to(device) for t in rotary_tables(cfg.head_dim, cfg.max_seq_len,
                                                                              cfg.rope_theta))
    return model


_OUT_PROJ = ("attn.wo.weight", ".w2.weight", "experts.w2_EFD")


def _init_param(model: MoETransformer, name: str, p: torch.Tensor, seed: int, std: float, out_std: float) -> None:
    """The same distributions as the constructors (normal, zeros for biases, ones for norms),
    drawn on the CPU from a generator seeded by the name (or the expert), then copied over."""
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name.rsplit(".", 2)[-2] or leaf == "bias":
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
