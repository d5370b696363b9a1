"""`moe serve`: load a model into the expert cache and serve it over HTTP with uvicorn.

    moe serve --checkpoint runs/tiny --gpu-expert-slots 8
    moe serve --hf path/to/qwen3-moe --gpu-expert-gib 20 --max-batch 16 --api-key "$KEY" --port 8000

The port is bound before the model loads, so a port in use is one error line (exit 2) at once.

Shutdown (SIGTERM or Ctrl-C): /health turns 503 and new requests get 503 while the server keeps
listening; running (and queued) requests may finish for --shutdown-timeout seconds, then whatever
still runs is cancelled (streams end with an error event); then the listener closes and the
process exits 0. A second signal cancels what still runs at once.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from moe_runtime.offload.serve.app import ServeContext, create_app
from moe_runtime.offload.serve.chat import load_server_chat
from moe_runtime.offload.serve.metrics import ServerMetrics, engine_cache_stats
from moe_runtime.offload.serve.scheduler import Scheduler
from moe_runtime.offload.serve.text import TokenizerAdapter


def build_context(args: argparse.Namespace) -> ServeContext:
    """Model -> expert-cache engine -> decode batch -> scheduler; tokenizer, chat template, EOS ids."""
    from moe_runtime.offload.config import CPU_EXPERTS_CHOICES, OffloadConfig
    from moe_runtime.offload.engine import ExpertCacheEngine
    from moe_runtime.offload.generate_cli import expert_settings, load_for_cache, policy_settings

    _check_args(args)
    model, run, tokenizer, store = load_for_cache(args)
    source = Path(args.hf or args.checkpoint)
    tok = TokenizerAdapter(model.cfg.vocab_size, tokenizer)
    config = OffloadConfig(gpu_expert_slots=args.gpu_expert_slots, gpu_expert_gib=args.gpu_expert_gib,
                           cpu_experts=CPU_EXPERTS_CHOICES[args.cpu_experts], device=args.device,
                           predictor=args.predictor, **policy_settings(args), **expert_settings(args, store))
    engine = ExpertCacheEngine(model, config, store=store)
    engine.reset_stats()  # /metrics counts from here: cumulative over the server's life
    metrics = ServerMetrics(cache_source=lambda: engine_cache_stats(engine))
    context = min(args.max_model_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    graphs = getattr(args, "cuda_graphs", False)
    batch = engine.decode_batch(max_batch=args.max_batch, max_len=context, decode=tok.decode,
                                max_prefill_tokens=args.max_prefill_tokens or None, cuda_graphs=graphs)
    batch.tune_threads()  # CPU: one intra-op thread for the pass sizes where that is faster (measured here)
    if batch.graphs is not None:
        batch.graphs.capture_all()  # every bucket now, not during the first requests
    engine.reset_stats()
    scheduler = Scheduler(batch, max_queue=args.max_queue, metrics=metrics)
    render_chat, eos_ids = load_server_chat(source, tokenizer)
    return ServeContext(model_name=args.model_name or run.name, scheduler=scheduler, tokenizer=tok,
                        render_chat=render_chat, max_seq_len=batch.max_len, eos_token_ids=eos_ids,
                        metrics=metrics, api_key=args.api_key, created=int(time.time()))


def _check_args(args: argparse.Namespace) -> None:
    for name in ("max_batch", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.max_prefill_tokens < 0:
        raise ValueError(f"--max-prefill-tokens={args.max_prefill_tokens} must be >= 1 (or 0: whole prompts at once)")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} is not a TCP port (0-65535)")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ValueError(f"--max-model-len={args.max_model_len} must be >= 2 (a prompt token and an answer token)")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout={args.shutdown_timeout} must be >= 0")
    if getattr(args, "cuda_graphs", False):  # before the model loads
        from moe_runtime.core.cuda_graphs import check_graph_device
        from moe_runtime.core.device import resolve_device
        check_graph_device(resolve_device(args.device))


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port), as uvicorn binds it, for uvicorn to listen on: taken
    before the model loads, so a busy port fails at once and no one can take it meanwhile."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        fix = ("another process is listening there: stop it or choose another --port"
               if e.errno == errno.EADDRINUSE else "choose another --host or --port")
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; {fix}") from None
    sock.set_inheritable(True)
    return sock


def make_server(ctx: ServeContext, *, host: str, port: int, shutdown_timeout: float, log_level: str = "warning"):
    """A uvicorn.Server for `ctx`; run it with .run() (main thread, signals) or serve() in a thread."""
    _preimport()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        ctx.scheduler.start()
        yield
        ctx.closing = True
        await asyncio.to_thread(ctx.scheduler.close, 0.5)

    app = create_app(ctx)
    app.router.lifespan_context = lifespan
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=shutdown_timeout + 2.0, lifespan="on")
    return _Server(config, ctx, shutdown_timeout)


def _preimport() -> None:
    """Import now what the first streamed response would import (anyio's asyncio backend, for
    Starlette's task group): otherwise the first requests pay for it (0.1-0.3 s of CPU measured
    on the 2-core host, where PYTHONDONTWRITEBYTECODE=1 compiles every module from source)."""
    with contextlib.suppress(ImportError):
        import anyio._backends._asyncio  # noqa: F401
        import anyio.streams.memory  # noqa: F401
        import anyio.streams.stapled  # noqa: F401


class _Server(uvicorn.Server):
    """uvicorn.Server with the shutdown of the module docstring. On the first SIGTERM/SIGINT:
    /health and new requests answer 503 (the listener stays open, so a load balancer's health
    check sees it), the scheduler drains for `shutdown_timeout` s in a helper thread and then
    cancels what still runs (streams end with an error event and [DONE]); only then does uvicorn
    close the listener and its connections (its own connection timeout, 2 s later, is a backstop).
    A second signal cancels at once. The signal is not re-raised after the graceful shutdown
    (uvicorn's default), so the process exits 0 and prints its summary."""

    def __init__(self, config: uvicorn.Config, ctx: ServeContext, shutdown_timeout: float):
        super().__init__(config)
        self.ctx, self.shutdown_timeout = ctx, shutdown_timeout

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:  # bound: say where (the real port, also with --port 0)
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            batch = self.ctx.scheduler.batch
            # pass_threads: the intra-op threads tune_threads chose per pass size (benchmarks depend on it)
            print(json.dumps({"event": "serving", "url": f"http://{host}:{port}/v1", "model": self.ctx.model_name,
                              "max_batch": self.ctx.scheduler.max_batch, "max_seq_len": self.ctx.max_seq_len,
                              "pass_threads": batch.pass_threads, "cuda_graphs": batch.graphs is not None}),
                  flush=True)

    def handle_exit(self, sig, frame) -> None:
        if not self.ctx.closing:
            self.ctx.closing = True
            self.ctx.scheduler.stop_accepting()
            threading.Thread(target=self._drain_then_exit, daemon=True).start()
            return
        threading.Thread(target=self.ctx.scheduler.close, args=(0.0,), daemon=True).start()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    def _drain_then_exit(self) -> None:
        self.ctx.scheduler.close(self.shutdown_timeout)
        self.should_exit = True  # uvicorn's main loop looks every 0.1 s


def run_serve(args: argparse.Namespace) -> int:
    _check_args(args)
    sock = listen_socket(args.host, args.port)
    try:
        ctx = build_context(args)
        server = make_server(ctx, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
                             log_level=args.log_level)
        server.run(sockets=[sock])
    finally:
        sock.close()
    print(json.dumps({"event": "stopped", "metrics": _final(ctx)}), flush=True)
    return 0


def _final(ctx: ServeContext) -> dict[str, Any]:
    s = ctx.metrics.snapshot()
    return {k: s[k] for k in ("prompt_tokens", "completion_tokens", "finish")}


__all__ = ["build_context", "listen_socket", "make_server", "run_serve"]
