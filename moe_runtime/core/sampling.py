"""Sampling controls and the events a decode produces (used by core/generation.py's DecodeBatch).

Legend: V vocab.

Logits processing order is transformers': repetition penalty (over prompt + generated tokens),
temperature, top-k, top-p; temperature 0 is greedy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import torch

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(kw_only=True, frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    """Tokens generated at most (the stopping token included)."""
    temperature: float = 0.0
    """0: greedy (argmax); > 0: sample from softmax(logits / temperature)."""
    top_k: int | None = None
    """Sample only from the k most likely tokens."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already in the prompt or output (CTRL / transformers rule)."""
    seed: int | None = None
    """This sequence's own torch.Generator seed (None: the batch generator, or torch's global one)."""
    eos_token_ids: tuple[int, ...] = ()
    """End-of-sequence ids (the checkpoint's); ignored when ignore_eos."""
    stop_token_ids: tuple[int, ...] = ()
    """More ids that end the sequence."""
    stop: tuple[str, ...] = ()
    """Strings that end the sequence when they appear in the decoded output (needs `decode`)."""
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        checks = [(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be >= 1"),
                  (self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 is greedy)"),
                  (self.top_k is None or self.top_k >= 1, f"top_k={self.top_k} must be >= 1 or None"),
                  (self.top_p is None or 0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1] or None"),
                  (self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be > 0"),
                  (all(s for s in self.stop), "stop strings must not be empty")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        for name in ("eos_token_ids", "stop_token_ids", "stop"):  # lists are accepted, stored as tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def end_ids(self) -> frozenset[int]:
        return frozenset(self.stop_token_ids) | (frozenset() if self.ignore_eos else frozenset(self.eos_token_ids))


def process_logits(logits_V: torch.Tensor, params: SamplingParams, history: Seq[int]) -> torch.Tensor:
    """transformers' order: repetition penalty, temperature, top-k, top-p. Returns float logits
    with removed tokens at -inf (temperature 0: only the penalty is applied)."""
    logits_V = logits_V.float()
    if params.repetition_penalty != 1.0 and len(history):
        ids = torch.tensor(sorted(set(history)), device=logits_V.device)
        score = logits_V[ids]
        logits_V = logits_V.clone()
        logits_V[ids] = torch.where(score < 0, score * params.repetition_penalty, score / params.repetition_penalty)
    if params.greedy:
        return logits_V
    logits_V = logits_V / params.temperature
    if params.top_k is not None:
        kth = logits_V.topk(min(params.top_k, logits_V.shape[-1])).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_V, order_V = logits_V.sort(descending=False)
        cum_V = sorted_V.softmax(-1).cumsum(-1)
        drop_V = cum_V <= 1 - params.top_p
        drop_V[-1] = False  # keep at least the most likely token
        logits_V = logits_V.masked_fill(drop_V.scatter(0, order_V, drop_V), float("-inf"))
    return logits_V


@dataclass
class TokenEvent:
    seq_id: int
    token: int
    text: str
    """New text safe to show (may be empty while a possible stop string is held back)."""
    finished: bool
    finish_reason: str | None
    """'stop' (EOS, stop token or stop string), 'length' or 'cancelled'; None while running."""


@dataclass
class SequenceOutput:
    tokens: list[int]
    text: str
    finish_reason: str
    stop_reason: int | str | None


__all__ = ["SamplingParams", "process_logits", "TokenEvent", "SequenceOutput", "FINISH_REASONS"]
