"""CUDA-graph decode (core/cuda_graphs.py): buckets, refusals, and the static step body.

The static body (what a graph records) runs eagerly on the CPU with capture=False, so its
bookkeeping (inactive rows, scratch slot, masks, left padding, rows joining and leaving) is
checked here against the eager decode; the recorded graph itself needs CUDA (@gpu tests)."""
from __future__ import annotations

import pytest
import torch

from moe_runtime.core.cuda_graphs import CUDA_GRAPHS_NEED_CUDA, GraphDecoder, bucket_for, graph_buckets
from moe_runtime.core.generation import DecodeBatch, SamplingParams, generate
from moe_runtime.core.model import MoETransformer
from tests.helpers import small_model

PROMPTS = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [11, 2, 9, 9, 30], [7], [3, 1, 4, 1, 5]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoETransformer(small_model(n_kv_heads=2, max_seq_len=64, init_std=0.2)).eval()


def test_buckets_are_powers_of_two_then_max_batch():
    assert graph_buckets(1) == [1]
    assert graph_buckets(16) == [1, 2, 4, 8, 16]
    assert graph_buckets(12) == [1, 2, 4, 8, 12]
    assert [bucket_for(n, graph_buckets(12)) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]
    with pytest.raises(ValueError, match="do not fit the largest bucket"):
        bucket_for(13, graph_buckets(12))
    with pytest.raises(ValueError, match="max_batch=0"):
        graph_buckets(0)


def test_cuda_graphs_are_refused_on_the_cpu(model):
    with pytest.raises(ValueError, match=CUDA_GRAPHS_NEED_CUDA):
        DecodeBatch(model, max_batch=2, max_len=16, cuda_graphs=True)
    with pytest.raises(ValueError, match=CUDA_GRAPHS_NEED_CUDA):
        generate(model, [[1, 2]], SamplingParams(max_new_tokens=2), cuda_graphs=True)


REQUESTS = [([3, 1, 4], 2), ([5, 9, 2, 6, 5], 12), ([11, 2, 9, 9], 12), ([7, 8], 12),
            (list(range(20, 34)), 6), ([4, 4, 6], 5)]
"""(prompt, max_new_tokens): the first stops at once and the 14-token prompt takes its row (row 0),
prefilling in 4-token chunks while rows 1-3 decode: row 0 is an inactive row of their bucket."""


def _served(model, graphs: bool, max_batch: int = 4) -> dict[int, list[int]]:
    """A server's pattern: deferred (chunked) prefills, rows joining while others decode, rows
    leaving at different lengths; decode through the static body (graphs=True, any device) or,
    with graphs="cuda", through captured CUDA graphs."""
    batch = DecodeBatch(model, max_batch=max_batch, max_len=40, max_prefill_tokens=4, cuda_graphs=graphs == "cuda")
    if graphs is True:
        batch.graphs = GraphDecoder(model, batch.cache, max_batch, capture=False)
    out: dict[int, list[int]] = {}
    queue = [(p, SamplingParams(max_new_tokens=n)) for p, n in REQUESTS]
    while queue or batch.running:
        while queue and batch.free_rows:
            p, sp = queue.pop(0)
            batch.add([p], [sp], defer=True)
        for e in batch.step():
            out.setdefault(e.seq_id, []).append(e.token)
    if graphs:
        assert batch.graphs.graphs, "the graph path never ran"
    return out


def test_static_body_decodes_the_eager_tokens(model):
    eager, static = _served(model, False), _served(model, True)
    assert static == eager and len(static) == len(REQUESTS)
    assert len({t for toks in eager.values() for t in toks}) > 8  # tokens that say something


def test_static_body_with_sliding_windows_and_sinks():
    """gpt-oss attention (core/attention_variants.py): a window shorter than the rows and per-head sink
    logits; the static body places each row's window at its own slot, as the eager decode does."""
    torch.manual_seed(1)
    cfg = small_model(n_kv_heads=2, max_seq_len=64, init_std=0.2, attn_sinks=True, sliding_window=3,
                      window_layers="even")
    m = MoETransformer(cfg).eval()
    with torch.no_grad():
        for blk in m.blocks:
            blk.attn.sinks.normal_(0, 1.0)
    eager, static = _served(m, False), _served(m, True)
    assert static == eager and len(static) == len(REQUESTS)


def test_static_body_with_left_padded_rows_and_the_bucket_below(model):
    """add() without defer left-pads the prompts (padding slots are not keys); after the longest
    sequence stops, the step runs in a smaller bucket."""
    params = [SamplingParams(max_new_tokens=n) for n in (6, 2, 3)]
    want = [o.tokens for o in generate(model, PROMPTS[:3], params)]
    batch = DecodeBatch(model, max_batch=3, max_len=20)
    batch.cache = type(batch.cache).empty(model.cfg, 3, 21, "cpu", torch.float32)  # one scratch slot
    batch.graphs = GraphDecoder(model, batch.cache, 3, capture=False)
    seqs, _ = batch.add(PROMPTS[:3], params)
    while batch.running:
        batch.step()
    assert [s.tokens for s in seqs] == want
    assert sorted(batch.graphs.graphs) == [1, 3]  # rows 1, 2 stop first: row 0 alone runs in bucket 1


def test_static_body_through_the_expert_cache_engine(model):
    """The engine's resident path (every expert in a slot) inside the static body: the tokens of
    the plain model's eager decode."""
    from moe_runtime.offload.engine import ExpertCacheEngine
    want = _served(model, False)
    torch.manual_seed(0)
    m = MoETransformer(small_model(n_kv_heads=2, max_seq_len=64, init_std=0.2)).eval()
    m.load_state_dict(model.state_dict())
    eng = ExpertCacheEngine(m, gpu_expert_slots=m.cfg.n_layers * m.cfg.moe.num_experts, device="cpu")
    assert eng.runtime.all_resident
    real = DecodeBatch.__init__

    def with_static_body(self, *a, **kw):
        real(self, *a, **kw)
        self.graphs = GraphDecoder(self.model, self.cache, self.cache.batch, capture=False)

    DecodeBatch.__init__ = with_static_body
    try:
        got = _served(eng.model, False)
    finally:
        DecodeBatch.__init__ = real
    assert got == want


def test_engine_refuses_graphs_without_every_expert_in_a_slot(model):
    from moe_runtime.offload.engine import ExpertCacheEngine
    eng = ExpertCacheEngine(MoETransformer(small_model(max_seq_len=64)).eval(), gpu_expert_slots=2, device="cpu")
    with pytest.raises(ValueError, match="needs every expert in a device slot"):
        eng.decode_batch(max_batch=2, max_len=16, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs every expert in a device slot"):
        eng.generate([[1, 2]], 3, cuda_graphs=True)
    full = ExpertCacheEngine(MoETransformer(small_model(max_seq_len=64)).eval(), gpu_expert_slots=99, device="cpu")
    with pytest.raises(ValueError, match=CUDA_GRAPHS_NEED_CUDA):
        full.generate([[1, 2]], 3, cuda_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_decode_tokens_equal_eager_decode_tokens_on_cuda():
    torch.manual_seed(0)
    m = MoETransformer(small_model(n_kv_heads=2, max_seq_len=64, init_std=0.2)).eval().cuda()
    assert _served(m, "cuda") == _served(m, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_decode_through_the_expert_cache_engine_on_cuda():
    from moe_runtime.offload.engine import ExpertCacheEngine
    torch.manual_seed(0)
    prompts, params = PROMPTS[:3], SamplingParams(max_new_tokens=8)
    m = MoETransformer(small_model(max_seq_len=64)).eval()
    want = [o.tokens for o in generate(m.cuda(), prompts, params)]
    eng = ExpertCacheEngine(m, gpu_expert_slots=10 ** 4, device="cuda")
    batch = eng.decode_batch(max_batch=4, max_len=32, cuda_graphs=True)
    batch.graphs.capture_all()
    seqs, _ = batch.add(prompts, [params] * 3)
    while batch.running:
        batch.step()
    assert [s.tokens for s in seqs] == want and batch.graphs.replays > 0
    assert eng.generate(prompts, params=params, cuda_graphs=True).tokens.tolist() == want


def test_moe_serve_refuses_cuda_graphs_on_the_cpu_before_loading(tmp_path, capsys):
    from moe_runtime.core.cli import main as moe_main
    missing = tmp_path / "no_such_run"  # the refusal comes first: nothing is loaded
    assert moe_main(["serve", "--checkpoint", str(missing), "--gpu-expert-slots", "4", "--device", "cpu",
                     "--cuda-graphs", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert CUDA_GRAPHS_NEED_CUDA in err and "drop --cuda-graphs" in err


def test_served_pattern_with_a_window_longer_than_every_row_equals_plain_attention():
    """The gpt-oss attention path (variant_attention) under the server's masks (chunked prefill, rows at
    different lengths, the model's additive key mask): a window no row reaches changes
    nothing, eager and static alike (it once read the additive mask as bool, inverting it)."""
    got = {}
    for name, kw in (("plain", {}), ("wide window", dict(sliding_window=60))):
        torch.manual_seed(1)
        m = MoETransformer(small_model(n_kv_heads=2, max_seq_len=64, init_std=0.2, **kw)).eval()
        got[name] = (_served(m, False), _served(m, True))
    assert got["wide window"] == got["plain"]
