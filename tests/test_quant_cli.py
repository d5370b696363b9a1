"""`moe quantize` writes a sealed checkpoint of quantised experts; `moe generate` / `moe serve`
load it as it is (or quantise a float checkpoint on load with --expert-dtype); the tokens are the
resident model's with the same quantised weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_runtime.core.cli import main as moe_main
from moe_runtime.core.manifest import CheckpointError
from moe_runtime.core.modelio import load_model
from moe_runtime.offload.quant_host import quantize_dequantize_banks
from moe_runtime.offload.quantize_cli import load_quantized, quantized_format
from tests.helpers import single_thread  # noqa: F401  (autouse: one torch thread)
from tests.serve_support import make_checkpoint

N = 6


def _generate(ckpt: Path, tmp: Path, *extra: str) -> list[int]:
    out = tmp / "gen.json"
    assert moe_main(["generate", "--checkpoint", str(ckpt), "--gpu-expert-slots", "3", "--device", "cpu",
                     "--prompt", "def ", "--max-new-tokens", str(N), "--json", str(out), *extra]) == 0
    report = json.loads(out.read_text())
    return report["tokens"][0], report


@torch.no_grad()
def _resident_tokens(ckpt: Path, fmt: str) -> list[int]:
    model, _, _ = load_model(ckpt)
    quantize_dequantize_banks(model, fmt)
    out = model.generate(torch.tensor([list(b"def ")]), N)
    return out[0, -N:].tolist()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("quant") / "run")


@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_quantize_then_generate_equals_resident(run_dir, tmp_path, fmt):
    q = tmp_path / f"run-{fmt}"
    assert moe_main(["quantize", "--checkpoint", str(run_dir), "--expert-dtype", fmt, "--out", str(q)]) == 0
    assert quantized_format(q)[0] == fmt
    want = _resident_tokens(run_dir, fmt)
    got, report = _generate(q, tmp_path)
    assert got == want
    on_load, _ = _generate(run_dir, tmp_path, "--expert-dtype", fmt)
    assert on_load == want
    plain, _ = _generate(run_dir, tmp_path)
    assert plain == _resident_tokens(run_dir, "bf16")  # the float checkpoint, unquantised


def test_quantized_checkpoint_is_sealed_and_checked(run_dir, tmp_path):
    q = tmp_path / "q"
    assert moe_main(["quantize", "--checkpoint", str(run_dir), "--expert-dtype", "int8", "--out", str(q)]) == 0
    _, _, store = load_quantized(q)
    assert store.layout.expert_dtype == "int8" and store.nbytes == store.layout.buffer_nbytes(store.layout.total_experts)
    shard = next(q.glob("step_*/model-rank00000.safetensors"))
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # one flipped byte in the last tensor's data
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(shard.parent)  # the step directory itself: no fallback to an older one


def test_expert_dtype_mismatch_is_one_clear_error(run_dir, tmp_path, capsys):
    q = tmp_path / "q8"
    assert moe_main(["quantize", "--checkpoint", str(run_dir), "--expert-dtype", "int8", "--out", str(q)]) == 0
    assert moe_main(["generate", "--checkpoint", str(q), "--gpu-expert-slots", "3", "--device", "cpu",
                     "--expert-dtype", "int4"]) == 2
    err = capsys.readouterr().err
    assert "holds int8 experts (written by `moe quantize`); drop --expert-dtype int4" in err


def test_serve_loads_quantised_checkpoint(run_dir, tmp_path):
    from tests.serve_support import serve_args
    from moe_runtime.offload.serve.server import build_context
    q = tmp_path / "qs"
    assert moe_main(["quantize", "--checkpoint", str(run_dir), "--expert-dtype", "int4", "--out", str(q)]) == 0
    ctx = build_context(serve_args(q))
    engine_store = ctx.scheduler.batch.model.blocks[0].ffn.experts._runtime[0].store
    assert engine_store.layout.expert_dtype == "int4"
    ctx2 = build_context(serve_args(run_dir, "--expert-dtype", "mxfp4"))
    assert ctx2.scheduler.batch.model.blocks[0].ffn.experts._runtime[0].store.layout.expert_dtype == "mxfp4"
