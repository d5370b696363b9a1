"""Load test of `moe serve` (issues 13, 23): continuous batching vs one request at a time, beside
`transformers serve` on the same weights, and a mixed load (long prompts arriving while short
streams run), loopback only.

    python bench/serve.py                                   # moe serve only, 64 requests, 16 clients, CPU
    python bench/serve.py --peer transformers --rounds 2    # + transformers serve, rounds interleaved
    python bench/serve.py --peer transformers --mixed       # + the mixed-load scenario
    python bench/serve.py --checkpoint runs/x --device cuda # an existing run (Mixtral-shaped for --peer)

The model: a Mixtral-shaped checkpoint (L=4, D=128, 8 experts top-2, 1.9M parameters, context
4096) trained for --train-steps steps with `moe train` on its default corpus (the byte
vocabulary), unless --checkpoint names a run. `moe serve` serves it with every expert in a device
slot; for --peer transformers it is exported with export_hf (family mixtral) beside a byte-level
tokenizer.json whose ids are the bytes, so both servers see the same token ids, and `transformers
serve` serves the export (on CPU with --cb-num-blocks: its default reserves 11.8 GB of RAM).

Modes (a fresh server each; their order alternates round by round, so drift in the host's load
falls on both sides): `moe serve --max-batch B` and `transformers serve --continuous-batching`
(batched), `moe serve --max-batch 1` and `transformers serve` without continuous batching (one
request at a time). The same request mix (prompts of 4-64 bytes, max_tokens 8-64, greedy,
streamed) goes from N concurrent clients to every mode. Every response is checked: each chunk a
well-formed text_completion chunk, finish_reason "length"; from moe serve also the closing
`data: [DONE]` (transformers serve 5.x sends none) and exactly max_tokens token ids; and every
mode's text must equal every other's.

Mixed load (--mixed, moe serve): --short-clients clients stream short requests (max_tokens 64) back
to back while --long-prompts prompts of --long-tokens bytes arrive one every --long-every
seconds; the inter-token latency (gap between successive chunks) of the short streams, p50/p99,
without long prompts, with them and chunked prefill (--max-prefill-tokens), and with them
prefilled whole (--max-prefill-tokens 0).

Writes bench/results/serve_<device>.{json,md} (or --out). Every wait is bounded (--timeout per
request and server start; a server that does not stop is killed).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_runtime.offload.report import cpu_model as report_cpu_model, device_name, utc_now  # noqa: E402
from moe_runtime.offload.serve.metrics import parse_prometheus  # noqa: E402

RESULTS = ROOT / "bench" / "results"
WORDS = "def class return import for while if else with yield lambda self value index".split()
MODEL_TOML = """name = "mixtral-tiny"
[model]
d_model = 128
n_layers = 4
n_heads = 4
n_kv_heads = 4
max_seq_len = 4096
[model.moe]
num_experts = 8
top_k = 2
d_expert = 128
[train]
max_steps = {steps}
batch_size = 8
seq_len = 128
lr = 3e-3
warmup_steps = 10
eval_interval = 100000
ckpt_interval = 100000
log_interval = 10
"""


# ---------------------------------------------------------------- the model
def train_checkpoint(out: Path, steps: int, timeout: float) -> Path:
    """A Mixtral-shaped run trained with `moe train` (its default corpus, byte vocabulary)."""
    cfg = out.parent / "mixtral_tiny.toml"
    cfg.write_text(MODEL_TOML.format(steps=steps))
    # one thread: a 1.9M-parameter model's ops are too small to share, and on a busy host every
    # parallel region waits for its slowest thread (20 s steps seen with two, 2026-12-07)
    cmd = [sys.executable, "-m", "moe_runtime", "train", "--config", str(cfg), "--out", str(out), "--no-progress",
           "--device", "cpu", "--threads", "1"]
    subprocess.run(cmd, check=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL)
    return out


def byte_tokenizer():
    """A tokenizers.Tokenizer whose ids are the UTF-8 bytes (GPT-2's byte-to-character table, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    tok = Tokenizer(models.BPE(vocab={chr(c): b for b, c in zip(bs, cs)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def export_for_transformers(ckpt: Path, out: Path) -> Path:
    from moe_runtime.core.hf import export_hf
    from moe_runtime.core.train import load_model
    model, run, _ = load_model(str(ckpt), device="cpu")
    if model.cfg.vocab_size != 256:
        raise SystemExit(f"--peer transformers needs a byte-vocabulary run (vocab 256); {ckpt} has {model.cfg.vocab_size}")
    export_hf(model, run, out, family="mixtral", tokenizer=byte_tokenizer())
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "model_max_length": model.cfg.max_seq_len}))
    return out


def model_facts(ckpt: Path) -> dict:
    from moe_runtime.core.train import load_model
    model, run, _ = load_model(str(ckpt), device="cpu")
    c = model.cfg
    return {"name": run.name, "params": sum(p.numel() for p in model.parameters()), "layers": c.n_layers,
            "d_model": c.d_model, "experts": c.moe.num_experts, "top_k": c.moe.top_k, "context": c.max_seq_len,
            "total_experts": c.num_moe_layers * c.moe.num_experts, "vocab": c.vocab_size}


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


# ---------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server in a subprocess on 127.0.0.1; ready when /health answers 200."""

    def __init__(self, cmd: list[str], url: str, model: str, timeout: float, log: Path):
        import httpx
        self.cmd, self.url, self.model = cmd, url, model
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"`{' '.join(cmd)}` exited with {self.proc.returncode} before serving; see {log}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"`{' '.join(cmd)}` did not answer /health within {timeout:.0f} s; see {log}")
            time.sleep(0.3)

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def moe_server(ckpt: Path, facts: dict, args, max_batch: int, logdir: Path, *extra: str) -> ServerProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "moe_runtime", "serve", "--checkpoint", str(ckpt),
           "--gpu-expert-slots", str(facts["total_experts"]), "--device", args.device, "--port", str(port),
           "--max-batch", str(max_batch), "--max-model-len", str(args.max_model_len), "--shutdown-timeout", "5",
           *extra]
    return ServerProcess(cmd, f"http://127.0.0.1:{port}", facts["name"], args.timeout,
                         logdir / f"moe-{max_batch}-{port}.log")


def transformers_server(hf_dir: Path, args, batching: bool, logdir: Path) -> ServerProcess:
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    cmd = [str(exe) if exe.exists() else "transformers", "serve", str(hf_dir), "--device", args.device,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--max-model-len",
           str(args.max_model_len)]
    if batching:
        cmd += ["--continuous-batching", "--cb-num-blocks", str(args.cb_num_blocks)]
    return ServerProcess(cmd, f"http://127.0.0.1:{port}", str(hf_dir), args.timeout,
                         logdir / f"transformers-{int(batching)}-{port}.log")


# ---------------------------------------------------------------- clients
def check_chunk(c: dict, rid: int) -> None:
    ok = (c.get("object") == "text_completion" and isinstance(c.get("id"), str) and len(c.get("choices", [])) == 1
          and isinstance(c["choices"][0].get("text"), str) and c["choices"][0].get("index") == 0)
    if not ok:
        raise ValueError(f"request {rid}: malformed chunk {c}")


async def one_request(client, server: ServerProcess, req: dict, timeout: float) -> dict:
    """Stream one completion; returns timings, text, token ids (moe serve) and the arrival time of
    every chunk that carried output; raises ValueError for a bad answer."""
    body = {"model": server.model, "prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0,
            "stream": True}
    moe = "moe_runtime" in server.cmd
    if moe:
        body["return_token_ids"] = True
    t0 = time.perf_counter()
    arrivals, tokens, text, finish, done = [], [], [], None, False
    async with client.stream("POST", f"{server.url}/v1/completions", json=body, timeout=timeout) as r:
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
            if ch.get("token_ids") or ch["text"]:
                arrivals.append(time.perf_counter())
            tokens += ch.get("token_ids") or []
            text.append(ch["text"])
            finish = ch.get("finish_reason") or finish
    # transformers serve (5.x) ends its streams after the finish chunk without `data: [DONE]`
    if (moe and not done) or finish != "length" or (moe and len(tokens) != req["max_tokens"]):
        raise ValueError(f"request {req['id']}: done={done} finish={finish} tokens={len(tokens)}/{req['max_tokens']}")
    if not arrivals:
        raise ValueError(f"request {req['id']}: no output")
    return {"id": req["id"], "ttft_s": arrivals[0] - t0, "latency_s": time.perf_counter() - t0, "text": "".join(text),
            "tokens": tokens, "completion_tokens": req["max_tokens"], "arrivals": arrivals}


async def load(server: ServerProcess, mix: list[dict], clients: int, timeout: float) -> tuple[list, list, float]:
    import httpx
    queue: asyncio.Queue = asyncio.Queue()
    for r in mix:
        queue.put_nowait(r)
    done, failed = [], []

    async def client_loop(client) -> None:
        while not queue.empty():
            req = queue.get_nowait()
            try:
                done.append(await one_request(client, server, req, timeout))
            except (ValueError, json.JSONDecodeError, httpx.HTTPError) as e:
                failed.append({"id": req["id"], "error": f"{type(e).__name__}: {e}"})

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return done, failed, wall


def cpu_model() -> str:
    return f"{report_cpu_model()}, {os.cpu_count()} cores visible"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def cpu_busy() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole host from /proc/stat (None where there is none)."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return sum(f) - idle, sum(f)


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system) of process `pid` and its live descendants, from /proc."""
    try:
        stats = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    f = (d / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(d.name)] = (int(f[1]), int(f[11]) + int(f[12]) + int(f[13]) + int(f[14]))
    except OSError:
        return None
    tree, total = {pid}, 0
    grew = True
    while grew:
        grew = False
        for p, (ppid, _) in stats.items():
            if ppid in tree and p not in tree:
                tree.add(p)
                grew = True
    total = sum(stats[p][1] for p in tree if p in stats)
    return total / os.sysconf("SC_CLK_TCK")


def measure(server: ServerProcess, mix: list[dict], args) -> dict:
    import httpx
    load_before, busy0 = os.getloadavg()[0], cpu_busy()
    try:
        cpu0 = tree_cpu_s(server.proc.pid)
        done, failed, wall = asyncio.run(load(server, mix, args.clients, args.timeout))
        cpu1 = tree_cpu_s(server.proc.pid)
        metrics = {}
        if "moe_runtime" in server.cmd:
            metrics = parse_prometheus(httpx.get(f"{server.url}/metrics", timeout=args.timeout).text)
    finally:
        rc = server.stop()
    busy1 = cpu_busy()
    toks = sum(d["completion_tokens"] for d in done)
    return {"requests": len(mix), "completed": len(done), "failed": failed, "lost_or_malformed": len(mix) - len(done),
            "wall_s": wall, "completion_tokens": toks, "tokens_per_s": toks / wall, "requests_per_s": len(done) / wall,
            "ttft_p50_s": pct([d["ttft_s"] for d in done], 0.5), "ttft_p99_s": pct([d["ttft_s"] for d in done], 0.99),
            "latency_p50_s": pct([d["latency_s"] for d in done], 0.5),
            "latency_p99_s": pct([d["latency_s"] for d in done], 0.99),
            "mean_decode_batch": metrics.get("moe_serve_mean_batch_size"), "server_exit_code": rc,
            "server_cpu_s": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None,
            "tokens_per_cpu_s": toks / (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None and cpu1 > cpu0 else None,
            "load_average_1m": [load_before, os.getloadavg()[0]],
            "host_cpu_busy": (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]) if busy0 and busy1 else None,
            "_text": {d["id"]: d["text"] for d in done}}


# ---------------------------------------------------------------- mixed load
async def mixed_load(server: ServerProcess, args, with_long: bool) -> dict:
    """Short streams back to back on --short-clients clients; long prompts arriving meanwhile.
    Returns the inter-token gaps of the short streams (those that ran while long prompts were in
    the system, when there are long prompts) and the long requests' TTFTs."""
    import httpx
    rng = random.Random(1)
    long_prompts = []
    for _ in range(args.long_prompts if with_long else 0):
        words = []
        while len(" ".join(words)) < args.long_tokens:
            words.append(rng.choice(WORDS))
        long_prompts.append(" ".join(words)[:args.long_tokens])
    stop = asyncio.Event()
    gaps, long_res, failed, short_n = [], [], [], 0
    window: list[tuple[float, float]] = []

    async def short_loop(client, k: int) -> None:
        nonlocal short_n
        i = 0
        while not stop.is_set():
            req = {"id": f"s{k}.{i}", "prompt": " ".join(WORDS[(k + i) % 5:(k + i) % 5 + 4]), "max_tokens": 64}
            i += 1
            try:
                r = await one_request(client, server, req, args.timeout)
            except (ValueError, json.JSONDecodeError, httpx.HTTPError) as e:
                failed.append(f"{req['id']}: {type(e).__name__}: {e}")
                continue
            short_n += 1
            a = r["arrivals"]
            gaps.extend((a[j - 1], a[j] - a[j - 1]) for j in range(1, len(a)))

    async def long_loop(client) -> None:
        await asyncio.sleep(args.long_every)
        tasks = []
        for j, p in enumerate(long_prompts):
            req = {"id": f"L{j}", "prompt": p, "max_tokens": 8}
            t = time.perf_counter()
            tasks.append(asyncio.create_task(one_request(client, server, req, args.timeout)))
            window.append((t, 0.0))
            await asyncio.sleep(args.long_every)
        for j, task in enumerate(tasks):
            try:
                r = await task
                long_res.append(r["ttft_s"])
                window[j] = (window[j][0], window[j][0] + r["latency_s"])
            except (ValueError, json.JSONDecodeError, httpx.HTTPError) as e:
                failed.append(f"L{j}: {type(e).__name__}: {e}")
        if not long_prompts:
            await asyncio.sleep(args.long_every * max(1, args.long_prompts))
        stop.set()

    limits = httpx.Limits(max_connections=args.short_clients + 8)
    async with httpx.AsyncClient(limits=limits) as client:
        await asyncio.gather(long_loop(client), *(short_loop(client, k) for k in range(args.short_clients)))
    if window:  # gaps that began while a long prompt was being served
        lo, hi = min(w[0] for w in window), max(w[1] for w in window)
        sel = [g for t, g in gaps if lo <= t <= hi]
    else:
        sel = [g for _, g in gaps]
    return {"short_requests": short_n, "gaps": len(sel), "itl_p50_s": pct(sel, 0.5), "itl_p99_s": pct(sel, 0.99),
            "itl_max_s": max(sel) if sel else float("nan"), "long_ttft_s": long_res, "failed": failed}


def run_mixed(ckpt: Path, facts: dict, args, logdir: Path) -> dict:
    cases = {"no long prompts": (False, args.max_prefill_tokens),
             f"long prompts, chunked prefill ({args.max_prefill_tokens} tokens/step)": (True, args.max_prefill_tokens),
             "long prompts, whole prefill (--max-prefill-tokens 0)": (True, 0)}
    out = {name: [] for name in cases}
    for r in range(args.rounds):
        names = list(cases) if r % 2 == 0 else list(reversed(cases))
        for name in names:
            with_long, chunk = cases[name]
            server = moe_server(ckpt, facts, args, args.max_batch, logdir, "--max-prefill-tokens", str(chunk))
            try:
                res = asyncio.run(mixed_load(server, args, with_long))
            finally:
                res["server_exit_code"] = server.stop()
            res["round"] = r
            out[name].append(res)
            print(f"[mixed round {r}] {name}: ITL p50 {res['itl_p50_s'] * 1e3:.1f} ms, p99 "
                  f"{res['itl_p99_s'] * 1e3:.1f} ms ({res['gaps']} gaps), load {os.getloadavg()[0]:.1f}", flush=True)
    return out


# ---------------------------------------------------------------- report
def markdown(res: dict) -> str:
    f = res["model"]
    lines = [f"# moe serve load test ({res['device_name']}, {res['date']})", "",
             f"{res['requests']} streamed greedy `/v1/completions` requests (prompts 4-64 bytes, max_tokens 8-64) "
             f"from {res['clients']} concurrent clients over loopback, {res['rounds']} rounds with the modes' order "
             f"alternating. Model: `{f['name']}`, Mixtral-shaped (L={f['layers']} D={f['d_model']} "
             f"E={f['experts']} top-{f['top_k']}, {f['params'] / 1e6:.2f}M parameters, byte vocabulary), "
             f"trained with `moe train`; moe serve holds every expert in a slot; transformers "
             f"{res.get('transformers_version', '-')} serves the same weights exported with `export_hf` "
             f"(byte tokenizer: both see the same ids). Identical greedy text across all modes: "
             f"{res['answers_identical']}. Host: {res['host']}.", "",
             "tokens/s is wall-clock; the server's CPU seconds (its process tree, user + system) give tokens per "
             "CPU-second, the figure that other processes' load on the host disturbs least.", "",
             "| mode | round | completed | lost or malformed | tokens/s | tokens per CPU-s | TTFT p50 (s) | "
             "TTFT p99 (s) | latency p50 (s) | latency p99 (s) | mean decode batch | host CPU busy | load avg 1m |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, runs in res["modes"].items():
        for m in runs:
            mb = "" if m["mean_decode_batch"] is None else f"{m['mean_decode_batch']:.2f}"
            busy = "" if m["host_cpu_busy"] is None else f"{100 * m['host_cpu_busy']:.0f}%"
            cpu = "" if m["tokens_per_cpu_s"] is None else f"{m['tokens_per_cpu_s']:.1f}"
            lines.append(f"| {name} | {m['round']} | {m['completed']} | {m['lost_or_malformed']} | "
                         f"{m['tokens_per_s']:.1f} | {cpu} | {m['ttft_p50_s']:.3f} | {m['ttft_p99_s']:.3f} | "
                         f"{m['latency_p50_s']:.3f} | {m['latency_p99_s']:.3f} | {mb} | {busy} | "
                         f"{m['load_average_1m'][0]:.1f} |")
    if res.get("ratios"):
        lines += ["", "Per round, moe serve / transformers serve (same round, adjacent runs):", "",
                  "| comparison | round | tokens/s ratio | tokens per CPU-s ratio | TTFT p50 ratio (lower is better) |",
                  "|---|---:|---:|---:|---:|"]
        for r in res["ratios"]:
            cpu = "" if r["tokens_per_cpu_s"] is None else f"{r['tokens_per_cpu_s']:.2f}x"
            lines.append(f"| {r['comparison']} | {r['round']} | {r['tokens_per_s']:.2f}x | {cpu} | {r['ttft_p50']:.2f}x |")
    if res.get("mixed"):
        a = res["mixed_args"]
        lines += ["", f"## Mixed load: {a['short_clients']} short streams (max_tokens 64) running while "
                      f"{a['long_prompts']} prompts of {a['long_tokens']} bytes arrive, one every {a['long_every']} s "
                      f"(moe serve --max-batch {res['max_batch']})", "",
                  "Inter-token latency of the short streams (gaps between successive chunks; with long prompts, "
                  "the gaps that began while one was being served).", "",
                  "| case | round | short requests | gaps | ITL p50 (ms) | ITL p99 (ms) | ITL max (ms) | long TTFT (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name, runs in res["mixed"].items():
            for m in runs:
                ttft = ", ".join(f"{t:.2f}" for t in m["long_ttft_s"]) or "-"
                lines.append(f"| {name} | {m['round']} | {m['short_requests']} | {m['gaps']} | "
                             f"{m['itl_p50_s'] * 1e3:.1f} | {m['itl_p99_s'] * 1e3:.1f} | {m['itl_max_s'] * 1e3:.1f} | "
                             f"{ttft} |")
    return "\n".join(lines) + "\n"


def ratios(modes: dict, rounds: int, max_batch: int) -> list[dict]:
    pairs = [("batched", f"moe serve --max-batch {max_batch}", "transformers serve --continuous-batching"),
             ("one at a time", "moe serve --max-batch 1", "transformers serve (no continuous batching)")]
    out = []
    for label, moe_name, hf_name in pairs:
        if not modes.get(moe_name) or not modes.get(hf_name):
            continue
        for r in range(rounds):
            a, b = modes[moe_name][r], modes[hf_name][r]
            cpu = (a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"]
                   if a["tokens_per_cpu_s"] and b["tokens_per_cpu_s"] else None)
            out.append({"comparison": label, "round": r, "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
                        "tokens_per_cpu_s": cpu, "ttft_p50": a["ttft_p50_s"] / b["ttft_p50_s"]})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16, help="rows of the continuous-batching runs")
    ap.add_argument("--max-prefill-tokens", type=int, default=256, help="moe serve's chunk size")
    ap.add_argument("--max-model-len", type=int, default=2304, help="context per sequence (both servers)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--peer", choices=["none", "transformers"], default="none")
    ap.add_argument("--cb-num-blocks", type=int, default=512, help="transformers serve's KV blocks (CPU RAM)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--checkpoint", default=None, help="a Mixtral-shaped byte-vocabulary run (default: train one)")
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--no-load", action="store_true", help="skip the load test (with --mixed: the mixed load only)")
    ap.add_argument("--mixed", action="store_true", help="also run the mixed-load scenario")
    ap.add_argument("--short-clients", type=int, default=4)
    ap.add_argument("--long-prompts", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=2048)
    ap.add_argument("--long-every", type=float, default=1.5, help="seconds between long prompts")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request / server start")
    ap.add_argument("--out", default=None, help="results stem (default bench/results/serve_<device>)")
    args = ap.parse_args()
    if min(args.requests, args.clients, args.max_batch, args.rounds) < 1 or args.max_prefill_tokens < 0:
        raise SystemExit("--requests, --clients, --max-batch and --rounds must be >= 1; --max-prefill-tokens >= 0")
    if args.long_tokens + 64 > args.max_model_len:
        raise SystemExit(f"--long-tokens {args.long_tokens} + 64 answer tokens exceed --max-model-len {args.max_model_len}")
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        ckpt = Path(args.checkpoint) if args.checkpoint else train_checkpoint(tmp / "run", args.train_steps, 3600)
        facts = model_facts(ckpt)
        print(f"model {facts} ready in {time.perf_counter() - t0:.0f} s", flush=True)
        hf_dir = export_for_transformers(ckpt, tmp / "hf") if args.peer == "transformers" else None
        mix = request_mix(args.requests, min(facts["context"], args.max_model_len))
        starts = {f"moe serve --max-batch {args.max_batch}": lambda: moe_server(ckpt, facts, args, args.max_batch, tmp),
                  "moe serve --max-batch 1": lambda: moe_server(ckpt, facts, args, 1, tmp)}
        if hf_dir is not None:
            starts["transformers serve --continuous-batching"] = lambda: transformers_server(hf_dir, args, True, tmp)
            starts["transformers serve (no continuous batching)"] = lambda: transformers_server(hf_dir, args, False, tmp)
        order = [k for pair in zip(list(starts)[:2], list(starts)[2:] or [None] * 2) for k in pair if k]
        modes: dict[str, list] = {k: [] for k in starts}
        for r in range(0 if args.no_load else args.rounds):
            for name in (order if r % 2 == 0 else list(reversed(order))):
                m = measure(starts[name](), mix, args)
                m["round"] = r
                modes[name].append(m)
                print(f"[round {r}] {name}: {m['tokens_per_s']:.1f} tok/s, TTFT p50 {m['ttft_p50_s']:.3f} s, "
                      f"{m['lost_or_malformed']} lost, load {m['load_average_1m'][1]:.1f}", flush=True)
        mixed = run_mixed(ckpt, facts, args, tmp) if args.mixed else None
    texts = [m.pop("_text") for runs in modes.values() for m in runs]
    identical = all(t == texts[0] and len(t) == len(mix) for t in texts) if texts else None
    dev = torch.device(args.device)
    name = device_name(dev) if dev.type == "cuda" else f"CPU: {cpu_model()}"
    res = {"device": args.device, "device_name": name, "date": utc_now(), "requests": args.requests,
           "clients": args.clients, "rounds": args.rounds, "max_batch": args.max_batch,
           "max_prefill_tokens": args.max_prefill_tokens, "model": facts, "answers_identical": identical,
           "host": f"{os.cpu_count()} cores visible, load average (1 min) {os.getloadavg()[0]:.1f} at the end",
           "modes": {k: v for k, v in modes.items() if v}, "ratios": ratios(modes, 0 if args.no_load else args.rounds, args.max_batch)}
    if hf_dir is not None:
        import transformers
        res["transformers_version"] = transformers.__version__
    if mixed is not None:
        res["mixed"] = mixed
        res["mixed_args"] = {k: getattr(args, k) for k in ("short_clients", "long_prompts", "long_tokens", "long_every")}
    stem = Path(args.out) if args.out else RESULTS / f"serve_{dev.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2))
    stem.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    bad = sum(m["lost_or_malformed"] for runs in modes.values() for m in runs)
    bad += sum(len(m["failed"]) for runs in (mixed or {}).values() for m in runs)
    return 0 if bad == 0 and identical in (True, None) else 1


if __name__ == "__main__":
    raise SystemExit(main())
