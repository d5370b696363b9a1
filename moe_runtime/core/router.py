"""Top-k router and the balance losses.

Legend: T tokens, D model dim, E experts, K top-k, L MoE layers.

The router returns per-expert counts separately from any loss, so that a distributed runner
can all-reduce the counts of every layer in one collective (see cluster/dispatch.py).

Load-balancing loss (Switch / GShard form), per MoE layer, averaged over layers:

    LBL = N_E * sum_i f_i * p_i
    f_i = (tokens routed to expert i) / (tokens * K)     -- no gradient
    p_i = mean over this micro-batch's tokens of the router probability of i  -- carries the gradient

It is 1.0 at perfect balance whatever E, K, T or the number of ranks. MoEConfig.balance_pooling =
"pooled" pools f and p over all MoE layers before the product instead (transformers' form, used
when fine-tuning a Hugging Face checkpoint with its own router_aux_loss_coef).

Where f_i comes from (MoEConfig.balance_scope / global_sync):
- "micro_batch": this micro-batch's own counts (on this rank only).
- "global_batch", global_sync="exact" (default): the counts of the WHOLE optimizer step, i.e. every
  gradient-accumulation micro-batch on every data-parallel rank. The trainer gets them with a
  no-grad routing pass over the step's micro-batches before the gradient passes (about +1/3 of a
  forward+backward in compute), so every micro-batch's gradient uses the same, final f. Then the
  mean of the micro-batch losses equals N_E * sum_i f_i * P_i with P_i the mean probability over
  the global batch, exactly, and the gradient is that loss's gradient. We pay the extra forward
  because the alternatives are biased: with a running count the first micro-batch of each step is
  balanced as if it were the whole batch, which is exactly the constraint global-batch balancing
  exists to remove.
- "global_batch", global_sync="cumulative": f from the counts of the micro-batches seen so far in
  this step, including the current one (Megatron-Core `global_aux_loss` style; no extra pass).
  The last micro-batch sees the whole step's counts; earlier ones see partial counts.

Across data-parallel ranks, each rank's loss uses the global f with its local p; data-parallel
gradient averaging then yields the gradient of the global loss with no 1/world-size shrink.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_runtime.core.config import MoEConfig


@dataclass
class RouterOutput:
    topk_idx_TK: torch.Tensor
    """[T, K] int64 expert ids."""
    topk_w_TK: torch.Tensor
    """[T, K] float32 combine weights."""
    counts_E: torch.Tensor
    """[E] int64 assignments per expert (no gradient)."""
    probs_mean_E: torch.Tensor
    """[E] float32 mean routing probability over the tokens (carries the gradient)."""
    z_loss: torch.Tensor
    """Scalar router z-loss, mean(logsumexp(logits)^2)."""


def _router_stats(topk_idx_TK, logits_TE, probs_TE, E: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts_E = torch.bincount(topk_idx_TK.reshape(-1), minlength=E)
    probs_mean_E = probs_TE.mean(dim=0) if logits_TE.shape[0] else probs_TE.sum(dim=0)
    z = torch.logsumexp(logits_TE, dim=-1).square().mean() if logits_TE.shape[0] else logits_TE.sum()
    return counts_E, probs_mean_E, z


class _DeferredStats(RouterOutput):
    """A RouterOutput whose counts_E, probs_mean_E and z_loss are computed on first read (the
    same values): a decode step reads none of them, and five ops per layer are a step's cost at
    batch 1."""

    def __init__(self, topk_idx_TK, topk_w_TK, logits_TE, probs_TE, E: int):  # noqa: D107 (no dataclass init)
        self.topk_idx_TK, self.topk_w_TK = topk_idx_TK, topk_w_TK
        self._src = (logits_TE, probs_TE, E)

    def __getattr__(self, name: str):
        if name in ("counts_E", "probs_mean_E", "z_loss") and "_src" in self.__dict__:
            logits_TE, probs_TE, E = self.__dict__.pop("_src")
            self.counts_E, self.probs_mean_E, self.z_loss = _router_stats(self.topk_idx_TK, logits_TE, probs_TE, E)
            return getattr(self, name)
        raise AttributeError(name)


class TopKRouter(nn.Module):
    """Scores experts for each token and keeps the top K."""

    def __init__(self, d_model: int, cfg: MoEConfig, init_std: float = 0.02):
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.score_func, self.norm_topk_prob = cfg.score_func, cfg.norm_topk_prob
        self.bias_update_rate = cfg.bias_update_rate
        self.weight_ED = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        nn.init.normal_(self.weight_ED, std=init_std)
        # Aux-free bias shifts which experts are *selected*; it never touches the combine weights.
        self.register_buffer("bias_E", torch.zeros(cfg.num_experts), persistent=cfg.aux_free_bias)
        self.aux_free_bias = cfg.aux_free_bias
        # gpt-oss: a learned bias on the logits (selection AND weights); None for every other family
        self.logit_bias_E = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.router_bias else None

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Routing in fp32: bf16 logits flip near-ties between experts and break exact replays.
        bias = self.logit_bias_E.float() if self.logit_bias_E is not None else None
        return F.linear(x_TD.float(), self.weight_ED.float(), bias)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = self.logits(x_TD)
        if self.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        select_TE = scores_TE.detach() + self.bias_E if self.aux_free_bias else scores_TE.detach()
        topk_idx_TK = select_TE.topk(self.top_k, dim=-1, sorted=True).indices
        topk_w_TK = scores_TE.gather(1, topk_idx_TK)
        if self.norm_topk_prob:  # with K=1 this gives weight 1.0 (no router gradient through the combine)
            topk_w_TK = topk_w_TK / topk_w_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        if not torch.is_grad_enabled():  # inference: the statistics only when someone reads them
            return _DeferredStats(topk_idx_TK, topk_w_TK, logits_TE, probs_TE, self.num_experts)
        counts_E, probs_mean_E, z = _router_stats(topk_idx_TK, logits_TE, probs_TE, self.num_experts)
        return RouterOutput(topk_idx_TK, topk_w_TK, counts_E, probs_mean_E, z)

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """DeepSeek-V3 update after an optimizer step: raise under-loaded experts, lower over-loaded."""
        if not self.aux_free_bias:
            return
        load_E = counts_E.float().to(self.bias_E.device)
        self.bias_E += self.bias_update_rate * torch.sign(load_E.mean() - load_E)


def balance_loss(probs_mean_LE: torch.Tensor, counts_LE: torch.Tensor, pooled: bool = False) -> torch.Tensor:
    """Mean over layers of N_E * sum_i f_i * p_i, f from counts (normalised to fractions).

    pooled=True: N_E * sum_i F_i * P_i with F and P pooled over all layers first (every layer sees
    the same tokens, so P is the mean of the layers' p). This is transformers'
    `load_balancing_loss_func` divided by K (its f sums to K over experts, ours to 1).
    """
    E = probs_mean_LE.shape[-1]
    if pooled:
        f_E = counts_LE.float().sum(dim=0) / counts_LE.float().sum().clamp_min(1.0)
        return E * (f_E * probs_mean_LE.mean(dim=0)).sum()
    f_LE = counts_LE.float() / counts_LE.float().sum(dim=-1, keepdim=True).clamp_min(1.0)
    return (E * (f_LE * probs_mean_LE).sum(dim=-1)).mean()


CountReducer = Callable[[torch.Tensor], torch.Tensor]


class BalanceTracker:
    """Holds the per-step expert counts and turns router outputs into the auxiliary losses.

    Use: `begin_step(step_counts)` (exact global mode: the step's counts from a pre-pass),
    then `losses(outputs)` once per micro-batch, then `end_step()` which returns the step's
    counts [L, E] (for logging and the aux-free bias update).

    `reduce` (optional) sums a [L, E] count tensor over ranks: ONE collective per call for all layers.
    """

    def __init__(self, cfg: MoEConfig, num_layers: int, reduce: CountReducer | None = None):
        self.cfg, self.num_layers, self.reduce = cfg, num_layers, reduce
        self.local_counts_LE: torch.Tensor | None = None
        self.synced_counts_LE: torch.Tensor | None = None
        self.target_counts_LE: torch.Tensor | None = None

    @property
    def needs_prepass(self) -> bool:
        c = self.cfg
        return c.balance_coef > 0 and c.balance_scope == "global_batch" and c.global_sync == "exact"

    def begin_step(self, step_counts_LE: torch.Tensor | None = None) -> None:
        """Start an optimizer step; in exact global mode pass the step's (rank-local) counts."""
        self.local_counts_LE = self.synced_counts_LE = self.target_counts_LE = None
        if step_counts_LE is not None:
            # collective: one all-reduce of [L, E] counts for the whole step.
            self.target_counts_LE = self._reduce(step_counts_LE)
        elif self.needs_prepass:
            raise RuntimeError("balance_scope='global_batch' with global_sync='exact' needs the step's "
                               "counts: call begin_step(counts) after a routing pre-pass")

    def _reduce(self, counts_LE: torch.Tensor) -> torch.Tensor:
        return self.reduce(counts_LE) if self.reduce is not None else counts_LE

    def losses(self, outputs: list[RouterOutput]) -> tuple[torch.Tensor, torch.Tensor]:
        """(balance loss, z-loss) for one micro-batch; both are means over MoE layers."""
        if not outputs:
            zero = torch.zeros((), requires_grad=False)
            return zero, zero
        local_LE = torch.stack([o.counts_E for o in outputs])
        probs_LE = torch.stack([o.probs_mean_E for o in outputs])
        z = torch.stack([o.z_loss for o in outputs]).mean()
        c = self.cfg
        self.local_counts_LE = _add(self.local_counts_LE, local_LE)
        if c.balance_scope == "micro_batch" or c.balance_coef == 0:
            f_LE = local_LE
        elif self.needs_prepass:
            f_LE = self.target_counts_LE
        else:
            # collective: one all-reduce of this micro-batch's counts for all layers.
            self.synced_counts_LE = _add(self.synced_counts_LE, self._reduce(local_LE))
            f_LE = self.synced_counts_LE
        return balance_loss(probs_LE, f_LE.to(probs_LE.device), pooled=c.balance_pooling == "pooled"), z

    def end_step(self) -> torch.Tensor | None:
        """The step's global counts [L, E] (summed over micro-batches and ranks)."""
        if self.target_counts_LE is not None:
            return self.target_counts_LE
        if self.synced_counts_LE is not None:
            return self.synced_counts_LE
        if self.local_counts_LE is None:
            return None
        return self._reduce(self.local_counts_LE)  # collective: one all-reduce per step


def _add(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x.clone() if acc is None else acc + x
