"""Registers `moe serve` with the `moe` command (entry point group `moe_runtime.commands`, see core/cli.py).

Only argparse here: FastAPI, uvicorn and torch load when the command runs, so `moe --help` works
without the `serve` extra installed.
"""
from __future__ import annotations

import argparse
import os


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (experts in host memory)",
                       description="An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                   "/v1/models, /health, /metrics) for one model served through the expert "
                                   "cache, with continuous batching. Binds 127.0.0.1 unless --host says otherwise.")
    add_serve_args(p)
    p.set_defaults(func=run)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from moe_runtime.offload.config import add_cpu_experts_arg, add_expert_dtype_arg
    from moe_runtime.offload.generate_cli import add_policy_args, add_tokenizer_arg
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="run directory (newest checkpoint) or a step_NNNNNNNN dir")
    src.add_argument("--hf", metavar="DIR", help="local Hugging Face MoE checkpoint directory; text goes through its "
                                                 "tokenizer.json when it has one (without one, the vocabulary must "
                                                 "be the 256 bytes)")
    add_tokenizer_arg(p)
    cap = p.add_mutually_exclusive_group(required=True)
    cap.add_argument("--gpu-expert-slots", type=int, help="device expert slots (experts held at once)")
    cap.add_argument("--gpu-expert-gib", type=float, help="device memory for expert slots, in GiB")
    add_policy_args(p)
    add_cpu_experts_arg(p)
    add_expert_dtype_arg(p)
    p.add_argument("--predictor", default="auto", choices=["auto", "none", "lookahead", "exact"],
                   help="auto: exact for pre-attention-routed models, else lookahead (predictive policy only)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; checked free before the model loads")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (continuous batching)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context per sequence (default: the model's max_seq_len); the KV cache holds "
                        "max-batch x this many positions")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a row before 429s")
    p.add_argument("--max-prefill-tokens", type=int, default=256,
                   help="prompt tokens prefilled per step, over all newcomers (chunked prefill: running streams "
                        "wait at most one chunk per token while a long prompt arrives); 0: whole prompts at once")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each decode step as a CUDA graph per batch-size bucket (needs --device cuda and "
                        "every expert in a slot; captured at start-up)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the run's name)")
    p.add_argument("--api-key", default=os.environ.get("MOE_SERVE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOE_SERVE_API_KEY; the "
                        "environment keeps the key out of the process list)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds running requests may finish after SIGTERM before they are cancelled")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (request lines at info)")


def run(args: argparse.Namespace) -> int:
    try:
        from moe_runtime.offload.serve.server import run_serve
    except ImportError as e:
        raise ImportError(f"`moe serve` needs FastAPI and uvicorn ({e}): pip install 'moe-runtime[serve]'") from None
    return run_serve(args)


__all__ = ["register", "add_serve_args", "run"]
