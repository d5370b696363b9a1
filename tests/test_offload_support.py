"""Shared pieces of the offload tests (small models, the resident reference, a small trained run),
and a check that the reference loop is MoETransformer.generate itself.

Every offload test runs torch with one intra-op thread: the models are tiny, and on a busy
two-core machine a second thread spin-waiting makes a step tens of times slower.
"""
from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import pytest
import torch

from moe_runtime.core.config import ModelConfig, MoEConfig, RunConfig, TrainConfig
from moe_runtime.core.data import Corpus
from moe_runtime.core.model import KVCache, MoETransformer
from tests.helpers import single_thread  # noqa: F401,E402  (autouse: one torch thread)


U_FP32 = 2.0 ** -24
"""fp32 unit roundoff."""


def fp32_reorder_bound(cfg: ModelConfig, want_logits: torch.Tensor) -> float:
    """How far two fp32 evaluations of the same model may differ in their logits when only the order
    of their sums differs (what the offloaded path may legitimately change: BLAS picks its blocking and
    vector width by shape, layout and CPU, so oneDNN on an AVX-512 AMD EPYC sums in another order than
    on the Intel machines where the equivalence tests were first written).

    A dot product of n terms summed in two orders differs by at most 2 gamma_n sum|a_i b_i|, with
    gamma_n = n u / (1 - n u) ~ n u (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
    section 3.1). Here n is the longest reduction in the model (max of d_model, the expert and dense
    hidden sizes), one such error enters at each residual update (2 per block) and one in the LM head,
    each reaches the logits with gain ~1, and sum|a_i b_i| is taken as the logits' largest magnitude.
    For the tiny test model this is ~3e-5 x max|logit|; a wrong expert or a stale slot moves logits by
    O(0.1), so the check still catches every real error, and tokens must still be equal."""
    n = max(cfg.d_model, cfg.moe.d_expert, cfg.moe.d_shared_expert or 0, cfg.d_dense_ffn or 0)
    return 2 * n * U_FP32 * (2 * cfg.n_layers + 1) * float(want_logits.abs().max())


def assert_logits_match(got: torch.Tensor, want: torch.Tensor, cfg: ModelConfig, what: str = "") -> None:
    """Offloaded logits == resident logits up to fp32 summation order (fp32_reorder_bound)."""
    err, bound = float((got - want).abs().max()), fp32_reorder_bound(cfg, want)
    assert err <= bound, f"logits differ{' for ' + what if what else ''}: max err {err:.3e} > fp32 bound {bound:.3e}"


def tiny_cfg(router_position: str = "post_attention", **kw) -> ModelConfig:
    """A shrunk `tiny` preset: 3 blocks, 8 experts, top-2, a shared expert."""
    moe = dict(num_experts=8, top_k=2, d_expert=24, num_shared_experts=1, d_shared_expert=16,
               router_position=router_position)
    moe.update(kw.pop("moe", {}))
    base = dict(d_model=32, n_layers=3, n_heads=4, max_seq_len=64, moe=MoEConfig(**moe))
    base.update(kw)
    return ModelConfig(**base)


def twin_models(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Two models with the same weights: one stays resident, one goes to an engine."""
    torch.manual_seed(seed)
    a = MoETransformer(cfg).to(dtype).eval()
    b = MoETransformer(cfg).to(dtype).eval()
    b.load_state_dict(a.state_dict())
    return a, b


@torch.no_grad()
def resident_generate(model: MoETransformer, prompt_BS: torch.Tensor, n: int):
    """MoETransformer.generate's greedy loop, also returning the logits of every drawn token."""
    B, S = prompt_BS.shape
    cache = KVCache.empty(model.cfg, B, S + n, prompt_BS.device, model.embed.weight.dtype)
    logits = model(prompt_BS, cache).logits[:, -1]
    out, seen = [], []
    for i in range(n):
        seen.append(logits.float().clone())
        nxt = logits.argmax(dim=-1)
        out.append(nxt)
        if i + 1 < n:
            logits = model(nxt[:, None], cache).logits[:, -1]
    return torch.stack(out, dim=1), torch.stack(seen)


def small_corpus() -> Corpus:
    """~100 KB of standard-library source, read byte-level (no file listing, no download)."""
    raw = b"".join(Path(m.__file__).read_bytes() for m in (argparse, textwrap))
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
    n_val = len(tokens) // 10
    return Corpus(tokens[:-n_val], tokens[-n_val:], "argparse.py + textwrap.py", 256)


def small_run(router_position: str, steps: int = 40) -> RunConfig:
    cfg = tiny_cfg(router_position, moe=dict(num_shared_experts=0, d_expert=32), max_seq_len=128)
    train = TrainConfig(max_steps=steps, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=4, eval_interval=steps,
                        eval_batches=1, ckpt_interval=steps, log_interval=steps, device="cpu")
    return RunConfig(name=f"offload-{router_position}", model=cfg, train=train)


def test_reference_loop_is_model_generate():
    model, _ = twin_models(tiny_cfg())
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    tokens, logits = resident_generate(model, prompt, 6)
    assert torch.equal(tokens, model.generate(prompt, 6))
    assert logits.shape == (6, 2, 256) and torch.equal(logits.argmax(-1).T, tokens)
