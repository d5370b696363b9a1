"""Generation controls and a step-wise decode batch that sequences join and leave (continuous batching).

Legend: B rows of the decode batch (= KV cache rows), S sequence, V vocab, n sequences stepped.

    from moe_runtime.core.generation import DecodeBatch, SamplingParams, generate, stream
    params = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1,
                            eos_token_ids=(2,), stop=("\\n\\n",))
    outs = generate(model, [[1, 2, 3], [4, 5]], params, decode=tok_decode)   # list[SequenceOutput]
    for ev in stream(model, [[1, 2, 3]], params, decode=tok_decode): ...     # TokenEvent per token

The step-wise object, for a server (one decode forward per step over every running sequence):

    batch = DecodeBatch(model, max_batch=8, max_len=2048, decode=tok_decode)
    seqs, events = batch.add([prompt_ids, ...], [params, ...])  # prefill (left-padded together)
    while batch.running:                                        # running: list[Sequence]
        events = batch.step()             # one token per running sequence -> list[TokenEvent]
        ...                               # add() more between steps; batch.cancel(seq_id) to drop one
    batch.free_rows                       # how many more sequences fit now

- `add` takes free cache rows, left-pads the prompts, runs one prefill forward for just those
  rows (others keep their state) and samples each new sequence's first token (its first event).
  `add(..., defer=True)` only takes the rows: the following `step()`s prefill the prompts after
  their decode pass, at most `max_prefill_tokens` (DecodeBatch argument) prompt tokens per step
  over all newcomers, in one pass right-padded to the longest chunk (chunked prefill: a long
  prompt delays the running sequences by one chunk per step, not its whole prefill).
- `step` feeds each running sequence its last token, at its own position, and samples the next.
- A sequence finishes on an EOS id (`eos_token_ids`, the checkpoint's), a stop token id, a stop
  string in its decoded text, or `max_new_tokens`; its row is freed at once. Each sequence has
  its own SamplingParams, torch.Generator (from `seed`) and stop state.
- TokenEvent.text is the new text safe to show: text that could still become a stop string, or an
  incomplete UTF-8 character, is held back; a stop string and what follows it are never shown.
  Sequence.tokens includes the token that stopped it (as transformers' generate does).
- cuda_graphs=True (DecodeBatch, generate, stream): on CUDA, decode passes replay one CUDA graph
  per batch-size bucket (core/cuda_graphs.py); refused on the CPU.
- Logits processing order is transformers': repetition penalty (over prompt + generated tokens),
  temperature, top-k, top-p; temperature 0 is greedy. Sampling draws each row from its own
  generator, so a sequence samples the same tokens alone or in any batch. A batch-wide
  `generator=` (old API) draws all sampled rows with one torch.multinomial call instead.
`model` is a MoETransformer, or anything with its forward(tokens_BS, cache, attention_mask_BS=,
cache_rows=) -> .logits, `.cfg` and `.embed` (ExpertCacheEngine's model, with its hooks, is one).
"""
from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence as Seq

import torch

from moe_runtime.core.cuda_graphs import GraphDecoder, check_graph_device
from moe_runtime.core.model import KVCache
from moe_runtime.core.sampling import FINISH_REASONS, SamplingParams, SequenceOutput, TokenEvent, process_logits

# SamplingParams, TokenEvent, SequenceOutput, process_logits and FINISH_REASONS live in core/sampling.py;
# they are imported from here as before.


@dataclass
class Sequence:
    """One request's state in a DecodeBatch."""

    seq_id: int
    prompt: list[int]
    params: SamplingParams
    row: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    """The token id or stop string that ended the sequence."""
    text: str = ""
    """Decoded output up to (not including) a stop string or EOS; complete once finished."""
    prefilled: int = 0
    """Prompt tokens in the KV cache so far (the whole prompt once its first token is drawn)."""
    _shown: int = 0

    @property
    def prefilling(self) -> bool:
        """Joined with add(defer=True) and not yet fully prefilled: no token drawn yet."""
        return self.prefilled < len(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StepStats:
    decode_rows: int = 0
    """Sequences that drew a token in the decode pass."""
    decode_s: float = 0.0
    prefill_tokens: int = 0
    """Prompt tokens prefilled (deferred prefills) after the decode pass."""
    prefill_s: float = 0.0


class DecodeBatch:
    """See the module docstring. `decode(ids) -> str` is needed for stop strings and event text."""

    def __init__(self, model, *, max_batch: int, max_len: int, decode: Callable[[list[int]], str] | None = None,
                 generator: torch.Generator | None = None, pad_id: int = 0, max_prefill_tokens: int | None = None,
                 cuda_graphs: bool = False):
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_len={max_len} >= 2")
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens={max_prefill_tokens} must be >= 1 (or None: whole prompts)")
        self.model, self.decode, self.generator, self.pad_id = model, decode, generator, pad_id
        self.max_prefill_tokens = max_prefill_tokens
        self.device = model.embed.weight.device
        if cuda_graphs:
            check_graph_device(self.device)
        self.max_len = min(max_len, model.cfg.max_seq_len)
        # deferred prefills of several rows share a pass right-padded to the longest chunk: the
        # scratch tail lands past a row's end, so the cache keeps one chunk of slack (without
        # max_prefill_tokens, rows whose tail would not fit are prefilled one per pass)
        slack = min(max_prefill_tokens, self.max_len) if max_prefill_tokens is not None else 0
        slack = max(slack, 1) if cuda_graphs else slack  # the graphs' scratch slot (core/cuda_graphs.py)
        self.cache = KVCache.empty(model.cfg, max_batch, max_len + slack, self.device, model.embed.weight.dtype)
        self.graphs = GraphDecoder(model, self.cache, max_batch) if cuda_graphs else None
        """cuda_graphs=True: decode passes replay a CUDA graph per batch-size bucket."""
        self.slots: list[Sequence | None] = [None] * max_batch
        self._ids = itertools.count()
        self.forward_passes = 0
        self.pass_threads: list[tuple[int, int]] = []
        """CPU intra-op threads per forward pass: (min tokens, threads) ascending, set by
        tune_threads(); empty: torch's setting for every pass."""
        self.last_step = StepStats()
        """What the last step() did (a server's metrics)."""
        self.last_logits: tuple[list[int], torch.Tensor] | None = None
        """(seq ids, [n, V] logits) of the last tokens drawn, before any processing."""

    @property
    def running(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    @property
    def free_rows(self) -> int:
        return sum(s is None for s in self.slots)

    # ---------------------------------------------------------------- joining
    def check(self, prompt: Seq[int], params: SamplingParams) -> None:
        """ValueError when this prompt and budget cannot run here (a server's 400)."""
        V = self.model.cfg.vocab_size
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        if not all(0 <= t < V for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {V})")
        if len(prompt) + params.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                             f"context of {self.max_len} tokens; shorten the prompt or lower max_new_tokens")
        if params.stop and self.decode is None:
            raise ValueError("stop strings need a decode function (token ids -> text); pass decode=")

    @torch.no_grad()
    def add(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams], *, defer: bool = False
            ) -> tuple[list[Sequence], list[TokenEvent]]:
        """Prefill new sequences into free rows (one forward, left-padded) and sample their first tokens.

        defer=True (a server): only take the rows; the prompts are prefilled by the following
        step() calls, at most max_prefill_tokens prompt tokens per step over all newcomers
        (chunked prefill: a long prompt cannot stall the running sequences for its whole
        prefill), several newcomers in one pass; a sequence's first token comes from the step
        that prefills its last chunk. Returns no events."""
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts) or not prompts:
            raise ValueError(f"{len(prompts)} prompts need as many SamplingParams (got {len(params_list)})")
        if len(prompts) > self.free_rows:
            raise ValueError(f"{len(prompts)} sequences do not fit the {self.free_rows} free rows; step until some finish")
        width = max(len(p) for p in prompts)
        for p, sp in zip(prompts, params_list):
            self.check(p, sp)
            if width + sp.max_new_tokens > self.cache.max_len - (self.graphs is not None):
                raise ValueError(f"left-padded to {width} tokens, a sequence with max_new_tokens={sp.max_new_tokens} "
                                 f"does not fit the {self.cache.max_len} cache slots; add it on its own")
        rows = [r for r, s in enumerate(self.slots) if s is None][:len(prompts)]
        seqs = []
        for r, p, sp in zip(rows, prompts, params_list):
            gen = torch.Generator(device=self.device).manual_seed(sp.seed) if sp.seed is not None else None
            seqs.append(Sequence(next(self._ids), list(p), sp, r, gen))
            if self.cache.lengths[r] or defer:  # a fresh cache stays on the dense path while every row runs
                self.cache.reset_row(r)
            self.slots[r] = seqs[-1]
        if defer:
            return seqs, []
        for s in seqs:
            s.prefilled = len(s.prompt)
        ids_BS = torch.tensor([[self.pad_id] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        mask_BS = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        logits = self._forward(ids_BS, mask_BS if any(len(p) < width for p in prompts) else None, rows)
        return seqs, self._advance(seqs, logits[:, -1])

    # ---------------------------------------------------------------- stepping
    @torch.no_grad()
    def step(self) -> list[TokenEvent]:
        """One decode forward over every running sequence (one event each), then, when sequences
        joined with add(defer=True), one prefill pass of their next chunks (an event for each
        whose prompt is now complete: its first token)."""
        seqs = [s for s in self.running if not s.prefilling]
        events: list[TokenEvent] = []
        t0 = time.perf_counter()
        if seqs and self.graphs is not None:
            self.forward_passes += 1
            events = self._advance(seqs, self.graphs.decode([s.row for s in seqs], [s.tokens[-1] for s in seqs]))
        elif seqs:
            last = torch.tensor([[s.tokens[-1]] for s in seqs], device=self.device)
            logits = self._forward(last, None, [s.row for s in seqs])
            events = self._advance(seqs, logits[:, -1])
        t1 = time.perf_counter()
        first, prefilled = self._prefill_chunks()
        events += first
        self.last_step = StepStats(len(seqs), t1 - t0, prefilled, time.perf_counter() - t1)
        return events

    @property
    def prefilling(self) -> list[Sequence]:
        """Sequences joined with add(defer=True) whose prompts are not fully prefilled yet."""
        return [s for s in self.running if s.prefilling]

    def _prefill_chunks(self) -> tuple[list[TokenEvent], int]:
        """Next chunks of the deferred prefills, oldest first, max_prefill_tokens in all: one
        forward pass over their rows (right-padded to the longest chunk). Returns the first-token
        events of the sequences whose prompts are now complete, and the prompt tokens prefilled."""
        budget = self.max_prefill_tokens or float("inf")
        chunks: list[tuple[Sequence, int]] = []
        for s in sorted(self.prefilling, key=lambda s: s.seq_id):
            if budget <= 0:
                break
            n = int(min(len(s.prompt) - s.prefilled, budget))
            chunks.append((s, n))
            budget -= n
        if not chunks:
            return [], 0
        chunks.sort(key=lambda c: c[0].row)  # ascending rows: consecutive ones are read without a gather
        width = max(n for _, n in chunks)
        fits = all(self.cache.lengths[s.row] + width <= self.cache.max_len for s, _ in chunks)
        events: list[TokenEvent] = []
        for group in [chunks] if fits else [[c] for c in chunks]:
            width = max(n for _, n in group)
            ids = [s.prompt[s.prefilled:s.prefilled + n] + [self.pad_id] * (width - n) for s, n in group]
            logits = self._forward(torch.tensor(ids, device=self.device), None, [s.row for s, _ in group],
                                   new_tokens=[n for _, n in group])[:, -1]
            done, keep = [], []
            for i, (s, n) in enumerate(group):
                s.prefilled += n
                if not s.prefilling:
                    done.append(s)
                    keep.append(i)
            if done:
                events += self._advance(done, logits[keep] if len(keep) < len(group) else logits)
        return events, sum(n for _, n in chunks)

    def cancel(self, seq_id: int) -> Sequence | None:
        """Drop a running sequence (a client went away); its row is free for the next add()."""
        for s in self.running:
            if s.seq_id == seq_id:
                self._finish(s, "cancelled", None)
                return s
        return None

    def _forward(self, ids_BS: torch.Tensor, mask_BS: torch.Tensor | None, rows: list[int], **kw) -> torch.Tensor:
        self.forward_passes += 1
        all_rows = rows == list(range(self.cache.batch)) and not kw
        with self._threads(ids_BS.numel()):
            return self.model(ids_BS, self.cache, attention_mask_BS=mask_BS, cache_rows=None if all_rows else rows,
                              last_logits_only=True, **kw).logits

    @contextlib.contextmanager
    def _threads(self, tokens: int):
        """Run a pass of `tokens` tokens with the intra-op thread count tune_threads() chose for it."""
        want = None
        for at_least, threads in self.pass_threads:
            if tokens >= at_least or want is None:
                want = threads
        have = torch.get_num_threads()
        if want is None or want == have:
            yield
            return
        torch.set_num_threads(want)
        try:
            yield
        finally:
            torch.set_num_threads(have)

    @torch.no_grad()
    def tune_threads(self, reps: int = 3) -> dict[int, dict[int, float]]:
        """On CPU with several intra-op threads: time decode passes of 1 and max_batch rows and a
        prefill chunk with one thread and with torch's count (interleaved, median of `reps`), and
        give each pass size the faster. Small passes on a busy host can cost many times more
        with threads (each parallel region waits for its slowest thread). Returns
        {tokens: {threads: seconds}}; runs forward passes on scratch caches (reset engine
        statistics afterwards)."""
        many = torch.get_num_threads()
        if self.device.type != "cpu" or many <= 1:
            return {}
        cfg, dtype = self.model.cfg, self.model.embed.weight.dtype
        sizes = sorted({1, self.cache.batch})
        chunk = min(self.max_prefill_tokens or 256, self.max_len - 1, 256)
        times: dict[int, dict[int, list[float]]] = {}

        def timed(threads: int, fn) -> float:
            torch.set_num_threads(threads)
            try:
                t = time.perf_counter()
                fn()
                return time.perf_counter() - t
            finally:
                torch.set_num_threads(many)

        for b in sizes:
            cache = KVCache.empty(cfg, b, 16 + 2 * reps + 1, self.device, dtype)
            self.model(torch.ones(b, 16, dtype=torch.long, device=self.device), cache)
            for _ in range(reps):
                for th in (1, many):
                    dt = timed(th, lambda: self.model(torch.ones(b, 1, dtype=torch.long, device=self.device), cache))
                    times.setdefault(b, {}).setdefault(th, []).append(dt)
        if chunk > max(sizes):
            cache = KVCache.empty(cfg, 1, chunk, self.device, dtype)
            for _ in range(reps):
                for th in (1, many):
                    cache.reset_row(0)
                    dt = timed(th, lambda: self.model(torch.ones(1, chunk, dtype=torch.long, device=self.device),
                                                      cache, cache_rows=[0]))
                    times.setdefault(chunk, {}).setdefault(th, []).append(dt)
        medians = {n: {th: sorted(ts)[len(ts) // 2] for th, ts in per.items()} for n, per in times.items()}
        self.pass_threads = [(n, min(per, key=per.get)) for n, per in sorted(medians.items())]
        return medians

    def _advance(self, seqs: list[Sequence], logits_nV: torch.Tensor) -> list[TokenEvent]:
        self.last_logits = ([s.seq_id for s in seqs], logits_nV)
        tokens = self._sample(seqs, logits_nV).tolist()  # host sync: stop checks and streaming need the ids
        return [self._append(s, t) for s, t in zip(seqs, tokens)]

    def _sample(self, seqs: list[Sequence], logits_nV: torch.Tensor) -> torch.Tensor:
        out_n = logits_nV.argmax(dim=-1)
        plain = all(s.params.repetition_penalty == 1.0 for s in seqs)
        if plain and all(s.params.greedy for s in seqs):
            return out_n
        shared: list[tuple[int, torch.Tensor]] = []
        for i, s in enumerate(seqs):
            x_V = process_logits(logits_nV[i], s.params, s.prompt + s.tokens)
            if s.params.greedy:
                out_n[i] = x_V.argmax()
            elif s.generator is None and self.generator is not None:
                shared.append((i, x_V.softmax(-1)))
            else:
                out_n[i] = torch.multinomial(x_V.softmax(-1), 1, generator=s.generator)[0]
        if shared:  # the batch-wide generator: one draw over all its rows, like MoETransformer.generate
            drawn = torch.multinomial(torch.stack([p for _, p in shared]), 1, generator=self.generator)[:, 0]
            out_n[torch.tensor([i for i, _ in shared], device=out_n.device)] = drawn
        return out_n

    # ---------------------------------------------------------------- stopping
    def _append(self, s: Sequence, token: int) -> TokenEvent:
        s.tokens.append(token)
        p = s.params
        text = self.decode(s.tokens) if self.decode is not None else ""
        hit = min(((text.find(x), x) for x in p.stop if x in text), default=None)
        if token in p.end_ids():
            self._finish(s, "stop", token)
        elif hit is not None:  # the first stop string; the text ends before it
            self._finish(s, "stop", hit[1], text=text[:hit[0]])
        elif len(s.tokens) >= p.max_new_tokens:
            self._finish(s, "length", None, text=text)
        else:
            s.text = text
        shown = len(s.text) if s.finished else self._safe_len(s)
        delta, s._shown = s.text[s._shown:shown], max(s._shown, shown)
        return TokenEvent(s.seq_id, token, delta, s.finished, s.finish_reason)

    def _safe_len(self, s: Sequence) -> int:
        """Text that cannot still turn into a stop string or an incomplete character."""
        text, n = s.text, len(s.text)
        for x in s.params.stop:
            for k in range(min(len(x) - 1, len(text)), 0, -1):
                if text.endswith(x[:k]):
                    n = min(n, len(text) - k)
                    break
        while n > 0 and text[n - 1] == "\ufffd":  # a byte-level character still being spelled
            n -= 1
        return n

    def _finish(self, s: Sequence, reason: str, stop_reason, text: str | None = None) -> None:
        s.finish_reason, s.stop_reason = reason, stop_reason
        if text is not None:
            s.text = text
        elif self.decode is not None:  # EOS / stop token / cancel: the text without the stopping token
            s.text = self.decode(s.tokens[:-1] if reason == "stop" else s.tokens)
        self.slots[s.row] = None
        self.cache.reset_row(s.row)


def _batch_for(model, prompts, params, decode, generator, max_len, cuda_graphs=False
               ) -> tuple[DecodeBatch, list[SamplingParams]]:
    params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if max_len is None:
        width = max((len(p) for p in prompts), default=0)
        max_len = width + max((sp.max_new_tokens for sp in params_list), default=1)
    return DecodeBatch(model, max_batch=max(1, len(prompts)), max_len=max_len, decode=decode,
                       generator=generator, cuda_graphs=cuda_graphs), params_list


def stream(model, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams], *,
           decode: Callable[[list[int]], str] | None = None, generator: torch.Generator | None = None,
           max_len: int | None = None, cuda_graphs: bool = False) -> Iterator[TokenEvent]:
    """Prompts of any lengths as one left-padded batch; yields every token as it is drawn
    (TokenEvent.seq_id is the prompt's index). cuda_graphs: decode steps replay CUDA graphs."""
    batch, params_list = _batch_for(model, prompts, params, decode, generator, max_len, cuda_graphs)
    _, events = batch.add(prompts, params_list)
    yield from events
    while batch.running:
        yield from batch.step()


def generate(model, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams], *,
             decode: Callable[[list[int]], str] | None = None, generator: torch.Generator | None = None,
             max_len: int | None = None, cuda_graphs: bool = False) -> list[SequenceOutput]:
    """Every sequence to its stop; one SequenceOutput per prompt, in order. cuda_graphs: decode
    steps replay CUDA graphs (core/cuda_graphs.py)."""
    batch, params_list = _batch_for(model, prompts, params, decode, generator, max_len, cuda_graphs)
    seqs, _ = batch.add(prompts, params_list)
    while batch.running:
        batch.step()
    return [SequenceOutput(s.tokens, s.text, s.finish_reason, s.stop_reason) for s in seqs]


__all__ = ["SamplingParams", "DecodeBatch", "Sequence", "SequenceOutput", "TokenEvent", "process_logits",
           "generate", "stream", "FINISH_REASONS"]
