"""Load test of `moe serve` (issue 13): continuous batching vs one request at a time, loopback only.

    python bench/serve.py                          # 64 requests, 16 clients, tiny preset shape, CPU
    python bench/serve.py --requests 128 --clients 32 --max-batch 16 --device cuda

A model of the `tiny` preset's shape (random weights, seed 0; the load test measures serving, not
text) is saved as a checkpoint; `moe serve` runs it in a subprocess on 127.0.0.1 (an ephemeral
port) with half of its experts in device slots, once with --max-batch B (continuous batching) and
once with --max-batch 1. The same request mix (prompt lengths and max_tokens drawn with a fixed
seed, greedy, streamed) is sent by N concurrent clients. Every response is checked: a complete SSE
stream ending in [DONE], each chunk a well-formed text_completion chunk, finish_reason "length"
with exactly max_tokens tokens, and the same tokens in both modes (batching must not change
answers). Reports throughput, time to first token and latency p50/p99 to
bench/results/serve_<device>.{json,md}. Every wait is bounded (--timeout per request, the
server is killed if it does not stop).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_runtime.core.checkpoint import save_checkpoint  # noqa: E402
from moe_runtime.core.config import get_preset  # noqa: E402
from moe_runtime.core.model import MoETransformer  # noqa: E402
from moe_runtime.offload.report import device_name, utc_now  # noqa: E402
from moe_runtime.offload.serve.metrics import parse_prometheus  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORDS = "def class return import for while if else with yield lambda self value index".split()


def make_checkpoint(out: Path) -> tuple[Path, int, int]:
    run = get_preset("tiny")
    torch.manual_seed(0)
    model = MoETransformer(run.model)
    save_checkpoint(out / "checkpoints", 0, {f"model/{k}": v for k, v in model.state_dict().items()},
                    run.to_dict(), {"step": 0})
    return out, run.model.max_seq_len, run.model.num_moe_layers * run.model.moe.num_experts


def request_mix(n: int, context: int, seed: int = 0) -> list[dict]:
    """Mixed lengths: prompts of 4-64 bytes, max_tokens of 8-64, all fitting the context."""
    rng = random.Random(seed)
    mix = []
    for i in range(n):
        words, plen = [], rng.randint(4, 64)
        while len(" ".join(words)) < plen:
            words.append(rng.choice(WORDS))
        prompt = " ".join(words)[:plen]
        mix.append({"id": i, "prompt": prompt, "max_tokens": min(rng.choice([8, 16, 32, 48, 64]),
                                                                 context - len(prompt.encode()))})
    return mix


class ServerProcess:
    """`moe serve` in a subprocess; the URL comes from its first output line (port 0: ephemeral)."""

    def __init__(self, ckpt: Path, *, slots: int, max_batch: int, device: str, timeout: float):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "moe_runtime", "serve", "--checkpoint", str(ckpt), "--gpu-expert-slots", str(slots),
               "--device", device, "--port", "0", "--max-batch", str(max_batch), "--shutdown-timeout", "5"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = box[0] if box else ""
        if not line:
            self.stop()
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {self.proc.returncode} before serving")
        self.url = json.loads(line)["url"].removesuffix("/v1")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def check_chunk(c: dict, rid: int) -> None:
    ok = (c.get("object") == "text_completion" and isinstance(c.get("id"), str) and len(c.get("choices", [])) == 1
          and isinstance(c["choices"][0].get("text"), str) and c["choices"][0].get("index") == 0)
    if not ok:
        raise ValueError(f"request {rid}: malformed chunk {c}")


async def one_request(client, url: str, req: dict, model: str, timeout: float) -> dict:
    """Stream one completion; returns timings and tokens, or raises ValueError for a bad answer."""
    body = {"model": model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "stream": True, "return_token_ids": True}
    t0 = time.perf_counter()
    first, tokens, text, finish, done = None, [], [], None, False
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise ValueError(f"request {req['id']}: HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line:
                continue
            if not line.startswith("data: ") or done:
                raise ValueError(f"request {req['id']}: unexpected line {line[:80]!r}")
            if line == "data: [DONE]":
                done = True
                continue
            c = json.loads(line[6:])
            check_chunk(c, req["id"])
            ch = c["choices"][0]
            if ch.get("token_ids") and first is None:
                first = time.perf_counter() - t0
            tokens += ch.get("token_ids", [])
            text.append(ch["text"])
            finish = ch.get("finish_reason") or finish
    if not done or finish != "length" or len(tokens) != req["max_tokens"]:
        raise ValueError(f"request {req['id']}: done={done} finish={finish} tokens={len(tokens)}/{req['max_tokens']}")
    return {"id": req["id"], "ttft_s": first, "latency_s": time.perf_counter() - t0, "tokens": tokens}


async def load(url: str, mix: list[dict], clients: int, model: str, timeout: float) -> tuple[list, list, float]:
    import httpx
    queue: asyncio.Queue = asyncio.Queue()
    for r in mix:
        queue.put_nowait(r)
    done, failed = [], []

    async def client_loop(client) -> None:
        while not queue.empty():
            req = queue.get_nowait()
            try:
                done.append(await one_request(client, url, req, model, timeout))
            except (ValueError, json.JSONDecodeError, httpx.HTTPError) as e:
                failed.append({"id": req["id"], "error": f"{type(e).__name__}: {e}"})

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return done, failed, wall


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores visible"
    except OSError:
        pass
    return "unknown CPU"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def run_mode(ckpt: Path, mix: list[dict], args, max_batch: int, slots: int) -> dict:
    server = ServerProcess(ckpt, slots=slots, max_batch=max_batch, device=args.device, timeout=args.timeout)
    try:
        import httpx
        done, failed, wall = asyncio.run(load(server.url, mix, args.clients, "tiny", args.timeout))
        metrics = parse_prometheus(httpx.get(f"{server.url}/metrics", timeout=args.timeout).text)
    finally:
        rc = server.stop()
    toks = sum(len(d["tokens"]) for d in done)
    return {"max_batch": max_batch, "requests": len(mix), "completed": len(done), "failed": failed,
            "lost_or_malformed": len(mix) - len(done), "wall_s": wall, "completion_tokens": toks,
            "tokens_per_s": toks / wall, "requests_per_s": len(done) / wall,
            "ttft_p50_s": pct([d["ttft_s"] for d in done], 0.5), "ttft_p99_s": pct([d["ttft_s"] for d in done], 0.99),
            "latency_p50_s": pct([d["latency_s"] for d in done], 0.5),
            "latency_p99_s": pct([d["latency_s"] for d in done], 0.99),
            "mean_decode_batch": metrics.get("moe_serve_mean_batch_size"),
            "hit_rate": metrics.get("moe_serve_expert_cache_hit_rate"),
            "server_exit_code": rc, "_tokens": {d["id"]: d["tokens"] for d in done}}


def markdown(res: dict) -> str:
    lines = [f"# moe serve load test ({res['device_name']}, {res['date']})", "",
             f"{res['requests']} streamed greedy requests from {res['clients']} concurrent clients over loopback; "
             f"model: `tiny` preset shape, random weights, {res['slots']}/{res['total_experts']} experts in slots "
             f"(policy predictive); prompts 4-64 bytes, max_tokens 8-64. Answers identical in both modes: "
             f"{res['answers_identical']}. Host load average (1 min) before / after: "
             f"{res['load_average_1m'][0]:.1f} / {res['load_average_1m'][1]:.1f}.", "",
             "| mode | completed | lost or malformed | tokens/s | requests/s | TTFT p50 (s) | TTFT p99 (s) | "
             "latency p50 (s) | latency p99 (s) | mean decode batch |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in res["modes"].items():
        lines.append(f"| {name} | {m['completed']} | {m['lost_or_malformed']} | {m['tokens_per_s']:.1f} | "
                     f"{m['requests_per_s']:.2f} | {m['ttft_p50_s']:.3f} | {m['ttft_p99_s']:.3f} | "
                     f"{m['latency_p50_s']:.3f} | {m['latency_p99_s']:.3f} | {m['mean_decode_batch']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16, help="rows of the continuous-batching run")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request / server start")
    ap.add_argument("--out", default=None, help="results stem (default bench/results/serve_<device>)")
    args = ap.parse_args()
    if args.requests < 1 or args.clients < 1 or args.max_batch < 1:
        raise SystemExit("--requests, --clients and --max-batch must be >= 1")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, context, total = make_checkpoint(Path(tmp) / "run")
        mix = request_mix(args.requests, context)
        slots = total // 2
        modes = {f"continuous batching (max-batch {args.max_batch})": run_mode(ckpt, mix, args, args.max_batch, slots),
                 "one at a time (max-batch 1)": run_mode(ckpt, mix, args, 1, slots)}
    a, b = (m.pop("_tokens") for m in modes.values())
    dev = torch.device(args.device)
    name = device_name(dev) if dev.type == "cuda" else f"CPU: {cpu_model()}"
    res = {"device": args.device, "device_name": name, "date": utc_now(), "requests": args.requests,
           "clients": args.clients, "slots": slots, "total_experts": total, "answers_identical": a == b,
           "load_average_1m": [load_before, os.getloadavg()[0]], "modes": modes}
    stem = Path(args.out) if args.out else RESULTS / f"serve_{dev.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2))
    stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    bad = sum(m["lost_or_malformed"] for m in modes.values())
    return 0 if bad == 0 and res["answers_identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
