"""Generation controls (core/generation.py) through the expert cache, each against a plain reference
loop: one prompt at a time, no padding, the model's plain forward, transformers' own logits
processors, a per-sequence torch.Generator, stop conditions checked by hand.

Covered: per-sequence EOS in a left-padded batch, top-p, top-k, repetition penalty, stop token ids,
stop strings (text ends before them), streaming (events spell the final output), sequences joining
and leaving a running DecodeBatch, validation errors.
"""
from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from moe_runtime.core.generation import DecodeBatch, SamplingParams, generate, stream
from moe_runtime.core.model import KVCache
from moe_runtime.offload.engine import ExpertCacheEngine
from tests.test_offload_support import single_thread, tiny_cfg, twin_models  # noqa: F401

PROMPTS = [list(b"def f(x):"), list(b"ab"), list(b"import os\n")]
N = 12


def decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


@torch.no_grad()
def reference(model, prompt: list[int], p: SamplingParams) -> tuple[list[int], str, str]:
    """The plain loop: (tokens, text, finish_reason) for one prompt alone."""
    cache = KVCache.empty(model.cfg, 1, len(prompt) + p.max_new_tokens, "cpu", torch.float32)
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    procs = []
    if p.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.temperature > 0:
        procs.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k is not None:
            procs.append(TopKLogitsWarper(p.top_k))
        if p.top_p is not None:
            procs.append(TopPLogitsWarper(p.top_p))
    logits = model(torch.tensor([prompt]), cache).logits[:, -1]
    out: list[int] = []
    while True:
        scores = logits.float()
        for proc in procs:
            scores = proc(torch.tensor([prompt + out]), scores)
        tok = int(scores.argmax(-1)) if p.temperature == 0 else int(torch.multinomial(scores.softmax(-1), 1, generator=gen))
        out.append(tok)
        text = decode(out)
        if tok in p.eos_token_ids or tok in p.stop_token_ids:
            return out, decode(out[:-1]), "stop"
        hits = [text.find(s) for s in p.stop if s in text]
        if hits:
            return out, text[:min(hits)], "stop"
        if len(out) == p.max_new_tokens:
            return out, text, "length"
        logits = model(torch.tensor([[tok]]), cache).logits[:, -1]


@pytest.fixture(scope="module")
def models():
    resident, offloaded = twin_models(tiny_cfg(max_seq_len=48))
    engine = ExpertCacheEngine(offloaded, device="cpu", gpu_expert_slots=6, policy="predictive")  # 25% of 24
    return resident, engine


def _check_engine(models, params, prompts=PROMPTS):
    resident, engine = models
    res = engine.generate(prompts, params=params, decode=decode)
    for b, (prompt, seq) in enumerate(zip(prompts, res.sequences)):
        tokens, text, reason = reference(resident, prompt, params if isinstance(params, SamplingParams) else params[b])
        assert seq.tokens == tokens, f"row {b}"
        assert (seq.text, seq.finish_reason) == (text, reason), f"row {b}"
    return res


def test_per_sequence_eos_in_padded_batch(models):
    resident, _ = models
    alone = [reference(resident, p, SamplingParams(max_new_tokens=N))[0] for p in PROMPTS]
    firsts = lambda t: [a.index(t) if t in a else N for a in alone]  # noqa: E731
    eos = next((t for t in alone[0] if len(set(firsts(t))) > 1 and min(firsts(t)) < N - 1), None)
    assert eos is not None, "no token stops the rows at different steps; change the prompts"
    res = _check_engine(models, SamplingParams(max_new_tokens=N, eos_token_ids=(eos,)))
    lengths = [len(s.tokens) for s in res.sequences]
    assert lengths == [min(f + 1, N) for f in firsts(eos)] and len(set(lengths)) > 1
    assert all(s.tokens[-1] == eos for s in res.sequences if s.finish_reason == "stop")
    assert res.tokens.shape == (3, max(lengths)) and (res.tokens[lengths.index(min(lengths)), min(lengths):] == -1).all()
    assert res.report["generated_tokens"] == sum(lengths)
    _, engine = models
    logits = engine.generate(PROMPTS, params=SamplingParams(max_new_tokens=N, eos_token_ids=(eos,)),
                             return_logits=True).logits
    assert logits.shape == (max(lengths), 3, 256)
    for b, n in enumerate(lengths):
        assert not logits[:n, b].isnan().any() and logits[n:, b].isnan().all()
        assert torch.equal(logits[:n, b].argmax(-1), res.tokens[b, :n])


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=N, temperature=0.9, top_p=0.8, seed=3),
    SamplingParams(max_new_tokens=N, temperature=1.3, top_k=20, top_p=0.95, seed=4),
    SamplingParams(max_new_tokens=N, repetition_penalty=1.8),
    SamplingParams(max_new_tokens=N, temperature=0.7, repetition_penalty=0.7, seed=5),
], ids=["top_p", "top_k+top_p", "repetition_greedy", "repetition_sampled"])
def test_sampling_controls_match_reference(models, params):
    _check_engine(models, params)


def test_controls_change_the_output(models):
    """The reference comparisons above would pass vacuously if a control did nothing."""
    resident, _ = models
    greedy = reference(resident, PROMPTS[0], SamplingParams(max_new_tokens=N))[0]
    assert reference(resident, PROMPTS[0], SamplingParams(max_new_tokens=N, repetition_penalty=1.8))[0] != greedy
    a = reference(resident, PROMPTS[0], SamplingParams(max_new_tokens=N, temperature=1.0, top_p=0.5, seed=1))[0]
    b = reference(resident, PROMPTS[0], SamplingParams(max_new_tokens=N, temperature=1.0, seed=1))[0]
    assert a != b


def test_stop_strings_and_stop_tokens(models):
    resident, _ = models
    runs = [reference(resident, p, SamplingParams(max_new_tokens=N)) for p in PROMPTS]
    alone = [r[1] for r in runs]
    stop = alone[1][3:5]
    assert stop and stop not in alone[1][:4]
    per_row = [SamplingParams(max_new_tokens=N, stop=(stop, "never")),
               SamplingParams(max_new_tokens=N, stop=(stop,)),
               SamplingParams(max_new_tokens=N, stop_token_ids=(runs[2][0][5],))]
    res = _check_engine(models, per_row)
    assert res.sequences[1].text == alone[1][:alone[1].index(stop)] and res.sequences[1].stop_reason == stop


def test_streaming_spells_the_output(models):
    _, engine = models
    params = SamplingParams(max_new_tokens=N, temperature=0.8, seed=9, stop=("e",))
    events = list(engine.stream(PROMPTS, params, decode=decode))
    outs = engine.generate(PROMPTS, params=params, decode=decode).sequences
    for b, out in enumerate(outs):
        mine = [e for e in events if e.seq_id == events[0].seq_id + b]
        assert [e.token for e in mine] == out.tokens
        assert "".join(e.text for e in mine) == out.text
        assert [e.finished for e in mine] == [False] * (len(mine) - 1) + [True]
        assert mine[-1].finish_reason == out.finish_reason
    assert len(events) == sum(len(o.tokens) for o in outs)
    events = list(engine.stream(PROMPTS, params, decode=decode))  # the report covers the streamed generation
    assert engine.report()["generated_tokens"] == len(events) and engine.report()["batch"] == 3


def test_streamed_text_holds_back_a_possible_stop_string():
    from moe_runtime.core.generation import Sequence
    batch = DecodeBatch.__new__(DecodeBatch)
    s = Sequence(0, [1], SamplingParams(stop=("END",)), 0, None, text="abcEN")
    assert batch._safe_len(s) == 3
    s.text = "ab\ufffd"
    assert batch._safe_len(s) == 2


def test_sequences_join_and_leave_a_running_batch(models):
    """Continuous batching: every sequence, whenever it joined, equals its prompt alone."""
    resident, engine = models
    engine.reset_stats()
    batch = engine.decode_batch(max_batch=2, max_len=40, decode=decode)
    short, long_ = SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=9, temperature=0.9, seed=2)
    (a,), _ = batch.add([PROMPTS[0]], long_)
    batch.step()
    (b,), _ = batch.add([PROMPTS[1]], short)  # joins while a decodes
    pending, done = [PROMPTS[2]], [a, b]
    while batch.running or pending:
        if pending and batch.free_rows:
            (c,), _ = batch.add([pending.pop()], long_)  # takes the row b left
            done.append(c)
        batch.step()
    for s in done:
        assert s.tokens == reference(resident, s.prompt, s.params)[0], s.seq_id
    assert batch.free_rows == 2 and engine.report()["hit_rate_all"] is not None


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_chunked_prefill_equals_each_prompt_alone(models, chunk):
    """Deferred (chunked) prefill through the expert cache: newcomers join a running batch, their
    prompts go in `chunk` tokens per step over all of them (None: whole prompts, still several
    per pass), sharing passes with decode steps; tokens and text equal each prompt alone, and a
    step never prefills more than `chunk` prompt tokens."""
    resident, engine = models
    batch = engine.decode_batch(max_batch=2, max_len=40, decode=decode, max_prefill_tokens=chunk)
    greedy, sampled = SamplingParams(max_new_tokens=7), SamplingParams(max_new_tokens=6, temperature=0.8, seed=3)
    queue = [(PROMPTS[0], greedy), (PROMPTS[1], sampled), (PROMPTS[2], greedy), (list(b"x = [1, 2, 3]"), sampled)]
    done, firsts, steps = [], {}, 0
    while queue or batch.running:
        while queue and batch.free_rows:
            (s,), events = batch.add([queue[0][0]], queue.pop(0)[1], defer=True)
            assert events == [] and s.prefilling
            done.append(s)
        for e in batch.step():
            firsts.setdefault(e.seq_id, steps)
        steps += 1
        assert batch.last_step.prefill_tokens <= (chunk or 10**6)
    for s in done:
        tokens, text, reason = reference(resident, s.prompt, s.params)
        assert (s.tokens, s.text, s.finish_reason) == (tokens, text, reason), s.seq_id
    if chunk == 1:  # a 9-token prompt takes 9 steps to its first token
        assert firsts[done[0].seq_id] == len(PROMPTS[0]) - 1
    assert batch.free_rows == 2


def test_cancel_frees_the_row(models):
    _, engine = models
    batch = engine.decode_batch(max_batch=1, max_len=30)
    (s,), _ = batch.add([PROMPTS[0]], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="free rows"):
        batch.add([PROMPTS[1]], SamplingParams(max_new_tokens=8))
    assert batch.cancel(s.seq_id) is s and s.finish_reason == "cancelled" and batch.free_rows == 1
    batch.add([PROMPTS[1]], SamplingParams(max_new_tokens=8))


def test_model_level_generate_and_stream(models):
    resident, _ = models
    params = SamplingParams(max_new_tokens=6, temperature=0.5, top_p=0.9, seed=1)
    outs = generate(resident, PROMPTS, params, decode=decode)
    assert [o.tokens for o in outs] == [reference(resident, p, params)[0] for p in PROMPTS]
    assert [e.token for e in stream(resident, PROMPTS[:1], params)] == outs[0].tokens


@pytest.mark.parametrize("kw,match", [
    (dict(top_p=0.0), "top_p=0.0"), (dict(temperature=-1), "temperature=-1"),
    (dict(max_new_tokens=0), "max_new_tokens=0"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(top_k=0), "top_k=0"), (dict(stop=("",)), "stop strings")])
def test_bad_sampling_params_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_bad_requests_are_named(models):
    _, engine = models
    batch = engine.decode_batch(max_batch=1, max_len=16)
    with pytest.raises(ValueError, match="exceeds the context of 16"):
        batch.add([[1] * 10], SamplingParams(max_new_tokens=7))
    with pytest.raises(ValueError, match="decode function"):
        batch.add([[1]], SamplingParams(stop=("x",), max_new_tokens=2))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        batch.add([[300]], SamplingParams(max_new_tokens=2))


def test_tune_threads_picks_a_count_per_pass_size_and_restores_torchs(models):
    resident, _ = models
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = DecodeBatch(resident, max_batch=4, max_len=40, max_prefill_tokens=8)
        timings = batch.tune_threads(reps=1)
        assert set(timings) == {1, 4, 8} and all(set(t) == {1, 2} for t in timings.values())
        assert [n for n, _ in batch.pass_threads] == [1, 4, 8]
        assert all(th == min(timings[n], key=timings[n].get) for n, th in batch.pass_threads)
        batch.pass_threads = [(1, 1), (4, 2)]
        seen = []
        real = resident.forward

        def spy(*a, **k):
            seen.append(torch.get_num_threads())
            return real(*a, **k)

        resident.forward = spy
        try:
            (s,), _ = batch.add([PROMPTS[0]], SamplingParams(max_new_tokens=3), defer=True)
            while batch.running:
                batch.step()
        finally:
            del resident.forward
        # the 9-token prompt: an 8-token chunk (the 4+ bucket's count), a 1-token chunk, then 2 decode steps
        assert seen == [2, 1, 1, 1]
        assert torch.get_num_threads() == 2 and s.tokens == reference(resident, PROMPTS[0], s.params)[0]
    finally:
        torch.set_num_threads(before)
    cuda_like = DecodeBatch(resident, max_batch=2, max_len=20)
    torch.set_num_threads(1)
    try:
        assert cuda_like.tune_threads() == {} and cuda_like.pass_threads == []
    finally:
        torch.set_num_threads(before)
