"""Shared test helpers: small configs and dtype-aware comparison."""
from __future__ import annotations

import pytest
import torch

from moe_runtime.core.config import MoEConfig, ModelConfig, RunConfig, TrainConfig

TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (2e-3, 2e-3)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, what: str = "") -> None:
    """Compare with tolerances from the dtype; the failure message prints max and mean error."""
    rtol, atol = TOL[dtype or expected.dtype]
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err = (a - e).abs()
    ok = bool(torch.all(err <= atol + rtol * e.abs())) and not bool(torch.isnan(a).any())
    assert ok, f"{what}: max abs err {float(err.max()):.3e}, mean {float(err.mean()):.3e} (rtol {rtol}, atol {atol})"


def small_moe(**kw) -> MoEConfig:
    base = dict(num_experts=4, top_k=2, d_expert=24)
    base.update(kw)
    return MoEConfig(**base)


def small_model(moe: MoEConfig | None = None, **kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, max_seq_len=32, moe=moe or small_moe())
    base.update(kw)
    return ModelConfig(**base)


def small_run(name: str = "t", moe: MoEConfig | None = None, model: dict | None = None, **train) -> RunConfig:
    tr = dict(max_steps=6, batch_size=2, seq_len=16, grad_accum=2, lr=1e-2, warmup_steps=2, eval_interval=3,
              eval_batches=2, log_interval=1, ckpt_interval=3, device="cpu")
    tr.update(train)
    return RunConfig(name=name, model=small_model(moe, **(model or {})), train=TrainConfig(**tr))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Import into a test module to run it on one torch thread: tiny matmuls lose more to thread
    hand-offs than they gain on a shared 2-core machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def interrupt_training_at(monkeypatch, step: int) -> None:
    """Ctrl-C in the middle of `moe train`: Trainer.train_step raises KeyboardInterrupt at `step`."""
    from moe_runtime.core.train import Trainer
    real = Trainer.train_step

    def interrupted(self):
        if self.step == step:
            raise KeyboardInterrupt
        return real(self)
    monkeypatch.setattr(Trainer, "train_step", interrupted)
