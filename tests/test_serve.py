"""`moe serve` over real HTTP: uvicorn on a free loopback port, the official `openai` client.

A tiny random model is saved as a checkpoint with the project's writer; the server runs in a
thread of this process (so a test can slow its decode steps), one test runs `moe serve` as a
subprocess and stops it with SIGTERM. Greedy answers are compared with `moe generate`'s tokens.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from moe.checkpoint import save_checkpoint  # noqa: E402
from moe.cli import build_parser, main as moe_main  # noqa: E402
from moe.config import MoEConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from moe.model import MoETransformer  # noqa: E402
from offload.serve.metrics import parse_prometheus  # noqa: E402
from offload.serve.server import build_context, make_server  # noqa: E402

KEY = "test-key"
NAME = "tiny-serve"
CTX = 128
TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] "


def make_checkpoint(out: Path) -> Path:
    moe = MoEConfig(num_experts=8, top_k=2, d_expert=24)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, max_seq_len=CTX, moe=moe)
    run = RunConfig(name=NAME, model=cfg, train=TrainConfig(max_steps=1, device="cpu"))
    torch.manual_seed(0)
    model = MoETransformer(cfg)
    save_checkpoint(out / "checkpoints", 1, {f"model/{k}": v for k, v in model.state_dict().items()},
                    run.to_dict(), {"step": 1})
    (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "run")


def serve_args(ckpt: Path, *extra: str):
    return build_parser().parse_args(["serve", "--checkpoint", str(ckpt), "--gpu-expert-slots", "6",
                                      "--device", "cpu", "--port", "0", *extra])


class ThreadServer:
    """uvicorn in a thread of this process, on an ephemeral loopback port."""

    def __init__(self, ckpt: Path, *extra: str):
        self.ctx = build_context(serve_args(ckpt, *extra))
        self.server = make_server(self.ctx, host="127.0.0.1", port=0, shutdown_timeout=2.0)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def metrics(self) -> dict[str, float]:
        return parse_prometheus(httpx.get(f"{self.url}/metrics").text)


@pytest.fixture(scope="module")
def srv(ckpt):
    torch.set_num_threads(1)
    s = ThreadServer(ckpt, "--api-key", KEY, "--max-batch", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def generate_tokens(ckpt: Path, tmp_path: Path, prompt: str, n: int) -> list[int]:
    """`moe generate`'s greedy tokens for `prompt` (the same engine, the plain generation loop)."""
    out = tmp_path / "gen.json"
    assert moe_main(["generate", "--checkpoint", str(ckpt), "--gpu-expert-slots", "6", "--device", "cpu",
                     "--prompt", prompt, "--max-new-tokens", str(n), "--json", str(out)]) == 0
    return json.loads(out.read_text())["tokens"][0]


def completion(client, prompt: str, n: int, **kw):
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body={"return_token_ids": True}, **kw)


# ---------------------------------------------------------------- happy paths
def test_models_health_and_auth(srv, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    assert httpx.get(f"{srv.url}/health").json()["status"] == "ok"
    r = httpx.get(f"{srv.url}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_completion_greedy_equals_moe_generate_streamed_and_not(srv, client, ckpt, capsys, tmp_path):
    prompt, n = "def main(", 24
    want = generate_tokens(ckpt, tmp_path, prompt, n)
    capsys.readouterr()
    r = completion(client, prompt, n)
    choice = r.model_dump()["choices"][0]
    assert choice["token_ids"] == want, "served greedy tokens differ from `moe generate`"
    text = bytes(want).decode("utf-8", errors="replace")
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == n
    chunks = list(completion(client, prompt, n, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert sum((c.model_dump()["choices"][0]["token_ids"] for c in chunks if c.choices), []) == want
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == n


def test_chat_uses_the_checkpoint_template(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = "[system] be brief\n[user] hi\n[assistant] "
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                       extra_body={"return_token_ids": True})
    choice = r.model_dump()["choices"][0]
    assert choice["prompt_token_ids"] == list(rendered.encode())
    assert choice["token_ids"] == completion(client, rendered, 12).model_dump()["choices"][0]["token_ids"]
    assert r.choices[0].message.role == "assistant" and r.usage.prompt_tokens == len(rendered)
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_ends_the_answer_without_it(client):
    full = completion(client, "import os", 20).choices[0].text
    stop = full[5:7]
    r = completion(client, "import os", 20, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in completion(client, "import os", 20, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_concurrent_requests_share_decode_steps_and_equal_each_alone(srv, client):
    prompts = [("x = ", 40), ("class A:", 8), ("for i in", 25), ("print(", 33), ("# note", 15), ("if a", 30)]
    alone = [completion(client, p, n).model_dump()["choices"][0]["token_ids"] for p, n in prompts]
    before = srv.metrics()
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        chunks = completion(client, prompts[i][0], prompts[i][1], stream=True)
        results[i] = sum((c.model_dump()["choices"][0]["token_ids"] for c in chunks), [])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [results.get(i) for i in range(len(prompts))] == alone, "a batched answer differs from its solo answer"
    after = srv.metrics()
    steps = after["moe_serve_decode_steps_total"] - before["moe_serve_decode_steps_total"]
    tokens = after["moe_serve_completion_tokens_total"] - before["moe_serve_completion_tokens_total"]
    assert tokens == sum(n for _, n in prompts)
    assert steps < tokens - len(prompts), f"{steps} decode steps for {tokens} tokens: requests did not share steps"


# ---------------------------------------------------------------- errors
ERRORS = [
    ("unknown model", {"model": "nope", "prompt": "a"}, 404, "model_not_found"),
    ("prompt past the context", {"prompt": "x" * CTX}, 400, "context_length_exceeded"),
    ("max_tokens past the context", {"prompt": "abc", "max_tokens": CTX}, 400, "context_length_exceeded"),
    ("n > 1", {"prompt": "a", "n": 2}, 400, "unsupported_parameter"),
    ("logprobs", {"prompt": "a", "logprobs": 2}, 400, "unsupported_parameter"),
    ("unknown argument", {"prompt": "a", "frobnicate": 1}, 400, "unsupported_parameter"),
    ("several prompts", {"prompt": ["a", "b"]}, 400, "unsupported_parameter"),
    ("token id outside the vocabulary", {"prompt": [1, 999]}, 400, None),
    ("negative max_tokens", {"prompt": "a", "max_tokens": -1}, 400, None),
    ("temperature out of range", {"prompt": "a", "temperature": 9}, 400, None),
    ("missing prompt", {}, 400, None),
    ("empty prompt", {"prompt": ""}, 400, None),
]
CHAT_ERRORS = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter"),
    ("chat logprobs", {"logprobs": True}, 400, "unsupported_parameter"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "unsupported_parameter"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "a"}]}, 400, None),
    ("chat max_tokens past the context", {"max_tokens": CTX}, 400, "context_length_exceeded"),
]


def _post(srv, path: str, content: bytes) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/{path}", content=content, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


def _assert_error(r: httpx.Response, status: int, code: str | None, what: str) -> None:
    assert r.status_code == status, f"{what}: {r.status_code} {r.text}"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], f"{what}: {err}"
    assert err["code"] == code, f"{what}: code {err['code']!r}"


@pytest.mark.parametrize("what,body,status,code", ERRORS, ids=[e[0] for e in ERRORS])
def test_completion_errors_are_openai_style_and_the_server_keeps_serving(srv, client, what, body, status, code):
    _assert_error(_post(srv, "completions", json.dumps({"model": NAME, **body}).encode()), status, code, what)
    assert completion(client, "ok", 3).choices[0].finish_reason == "length"


@pytest.mark.parametrize("what,body,status,code", CHAT_ERRORS, ids=[e[0] for e in CHAT_ERRORS])
def test_chat_errors(srv, client, what, body, status, code):
    base = {"model": NAME, "messages": [{"role": "user", "content": "a"}]}
    _assert_error(_post(srv, "chat/completions", json.dumps({**base, **body}).encode()), status, code, what)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}], max_tokens=2)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies(srv, client, raw):
    _assert_error(_post(srv, "completions", raw), 400, None, repr(raw))
    assert completion(client, "ok", 2).usage.completion_tokens == 2


def test_openai_client_raises_on_unknown_model(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="a", max_tokens=CTX)


# ---------------------------------------------------------------- disconnects and shutdown
def _slow_steps(ctx, delay: float):
    real = ctx.scheduler.batch.step

    def step():
        time.sleep(delay)
        return real()

    ctx.scheduler.batch.step = step
    return real


def _wait_for(pred, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_disconnect_mid_stream_frees_the_slot(srv):
    real = _slow_steps(srv.ctx, 0.05)  # 100 tokens would take 5 s: the disconnect comes well before
    try:
        before = srv.metrics().get('moe_serve_finished_total{reason="cancelled"}', 0)
        body = {"model": NAME, "prompt": "while True:", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
            lines = r.iter_lines()
            assert next(l for l in lines if l.startswith("data: "))
            assert srv.metrics()["moe_serve_running_sequences"] == 1
        _wait_for(lambda: srv.metrics()["moe_serve_running_sequences"] == 0, "the row was not freed")
        m = srv.metrics()
        assert m['moe_serve_finished_total{reason="cancelled"}'] == before + 1
        assert srv.ctx.scheduler.batch.free_rows == srv.ctx.scheduler.max_batch
    finally:
        srv.ctx.scheduler.batch.step = real


def test_shutdown_cancels_running_requests_within_the_bound(ckpt):
    s = ThreadServer(ckpt, "--max-batch", "2")
    _slow_steps(s.ctx, 0.05)
    got: list[str] = []

    def stream() -> None:
        body = {"model": NAME, "prompt": "abc", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
            got.extend(l for l in r.iter_lines() if l)

    t = threading.Thread(target=stream)
    t.start()
    _wait_for(lambda: s.ctx.scheduler.running == 1, "the request did not start")
    t0 = time.monotonic()
    s.ctx.closing = True
    s.ctx.scheduler.close(0.2)  # what SIGTERM starts: drain 0.2 s, then cancel
    t.join(10)
    s.stop()
    assert time.monotonic() - t0 < 5
    assert got[-1] == "data: [DONE]" and "shutting down" in got[-2], got[-3:]
    assert not s.thread.is_alive()


def test_cli_serve_and_sigterm_finishes_running_stream(ckpt):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "moe", "serve", "--checkpoint", str(ckpt), "--gpu-expert-slots",
                             "4", "--device", "cpu", "--port", "0", "--shutdown-timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["event"] == "serving" and first["url"].startswith("http://127.0.0.1:")
        port = int(first["url"].rsplit(":", 1)[1].split("/")[0])
        body = {"model": NAME, "prompt": "abc", "max_tokens": CTX - 4, "temperature": 0, "stream": True}
        lines = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=30) as r:
            it = r.iter_lines()
            lines.append(next(it))
            proc.send_signal(signal.SIGTERM)
            lines += [l for l in it if l]
        chunks = [json.loads(l[6:]) for l in lines if l.startswith("data: {")]
        assert lines[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert proc.wait(30) == 0
        last = json.loads(proc.stdout.read().strip().splitlines()[-1])
        assert last["event"] == "stopped" and last["metrics"]["finish"] == {"length": 1}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_eos_from_the_checkpoint_stops_and_a_full_queue_answers_429(srv, client, ckpt, tmp_path):
    want = completion(client, "def f(x):", 10).model_dump()["choices"][0]["token_ids"]
    eos = want[3]
    run = tmp_path / "run"
    shutil.copytree(ckpt, run)
    (run / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    s = ThreadServer(run, "--max-batch", "1", "--max-queue", "1")
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0, timeout=60)
        r = completion(c, "def f(x):", 10).model_dump()["choices"][0]
        stop_at = want.index(eos)
        assert r["finish_reason"] == "stop" and r["token_ids"] == want[:stop_at + 1]
        assert r["text"] == bytes(want[:stop_at]).decode("utf-8", errors="replace")
        _slow_steps(s.ctx, 0.05)
        body = {"model": NAME, "prompt": "abc", "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection (a disconnect)
            next(lines)
            waiting = threading.Thread(target=lambda: httpx.post(f"{s.url}/v1/completions", timeout=30,
                                                                 json={**body, "stream": False, "max_tokens": 2}))
            waiting.start()
            _wait_for(lambda: s.metrics()["moe_serve_queue_depth"] == 1, "the second request did not queue")
            _assert_error(httpx.post(f"{s.url}/v1/completions", json=body, timeout=30), 429, "queue_full", "full queue")
        waiting.join(30)
        assert completion(c, "ok", 2).usage.completion_tokens == 2
    finally:
        s.stop()


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_hf_checkpoint_chat_template_and_tokenizer(tmp_path):
    """--hf: transformers' own rendering of the checkpoint's template, tokenizer.json in and out,
    greedy tokens equal to `moe generate --hf`."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "user", "assistant", "the", "cat", "sat", "on", "mat"]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    cfg = transformers.MixtralConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=24, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, eos_token_id=None,
                                     bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    messages = [{"role": "user", "content": "the cat sat"}]
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHATML)
    rendered = fast.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = tmp_path / "gen.json"
    assert moe_main(["generate", "--hf", str(tmp_path / "hf"), "--gpu-expert-slots", "3", "--device", "cpu",
                     "--prompt-ids", ",".join(map(str, tok.encode(rendered).ids)), "--max-new-tokens", "8",
                     "--json", str(out)]) == 0
    want = json.loads(out.read_text())["tokens"][0]
    args = build_parser().parse_args(["serve", "--hf", str(tmp_path / "hf"), "--gpu-expert-slots", "3",
                                      "--device", "cpu", "--port", "0", "--model-name", "mixtral-tiny"])
    ctx = build_context(args)
    server = make_server(ctx, host="127.0.0.1", port=0, shutdown_timeout=1.0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _wait_for(lambda: server.started, "the server did not start")
    try:
        port = server.servers[0].sockets[0].getsockname()[1]
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="mixtral-tiny", messages=messages, max_tokens=8, temperature=0,
                                      extra_body={"return_token_ids": True}).model_dump()["choices"][0]
        assert r["prompt_token_ids"] == tok.encode(rendered).ids
        assert r["token_ids"] == want
        assert r["message"]["content"] == tok.decode(want)
    finally:
        server.should_exit = True
        thread.join(20)


def test_cli_registration_defaults_and_argument_errors(ckpt, capsys):
    assert "serve" in build_parser().format_help()
    args = build_parser().parse_args(["serve", "--checkpoint", str(ckpt), "--gpu-expert-slots", "4"])
    assert (args.host, args.port, args.api_key is None or "MOE_SERVE_API_KEY" in os.environ) == ("127.0.0.1", 8000, True)
    for flag, value, msg in (("--max-batch", "0", "--max-batch=0 must be >= 1"),
                             ("--port", "70000", "--port=70000 is not a TCP port"),
                             ("--max-model-len", "1", "--max-model-len=1 must be >= 2")):
        assert moe_main(["serve", "--checkpoint", str(ckpt), "--gpu-expert-slots", "4", flag, value]) == 2
        assert msg in capsys.readouterr().err


def test_a_failing_prefill_or_step_answers_500_and_the_server_keeps_serving(srv, client):
    batch = srv.ctx.scheduler.batch
    for name in ("add", "step"):
        real = getattr(batch, name)

        def broken(*a, real=real, name=name, **kw):
            setattr(batch, name, real)  # fail once
            raise RuntimeError(f"injected {name} failure")

        setattr(batch, name, broken)
        with pytest.raises(openai.InternalServerError, match=f"injected {name} failure"):
            completion(client, "abc", 5)
        assert getattr(batch, name) is real
        assert completion(client, "abc", 5).choices[0].finish_reason == "length"
        _wait_for(lambda: batch.free_rows == srv.ctx.scheduler.max_batch, "a row stayed taken")


def test_unexpected_errors_are_500_json(srv, client):
    real = srv.ctx.render_chat
    srv.ctx.render_chat = lambda messages: 1 / 0
    try:
        with pytest.raises(openai.InternalServerError, match="ZeroDivisionError"):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}], max_tokens=2)
    finally:
        srv.ctx.render_chat = real
    r = httpx.get(f"{srv.url}/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}],
                                          max_tokens=2).usage.completion_tokens == 2


def test_seeded_sampling_equals_moe_generate_alone_or_batched(srv, client, ckpt, tmp_path, capsys):
    out = tmp_path / "gen.json"
    assert moe_main(["generate", "--checkpoint", str(ckpt), "--gpu-expert-slots", "6", "--device", "cpu",
                     "--prompt", "x = [", "--max-new-tokens", "16", "--temperature", "0.9", "--top-p", "0.95",
                     "--top-k", "50", "--seed", "7", "--json", str(out)]) == 0
    capsys.readouterr()
    want = json.loads(out.read_text())["tokens"][0]
    kw = dict(model=NAME, prompt="x = [", max_tokens=16, temperature=0.9, top_p=0.95, seed=7,
              extra_body={"top_k": 50, "return_token_ids": True})
    assert client.completions.create(**kw).model_dump()["choices"][0]["token_ids"] == want
    got: list = []
    other = threading.Thread(target=lambda: completion(client, "noise " * 5, 30))
    other.start()
    got.append(client.completions.create(**kw).model_dump()["choices"][0]["token_ids"])
    other.join(30)
    assert got == [want], "a seeded answer changed when it shared the batch"


def test_metrics_page_is_prometheus_text_with_every_figure(srv, client):
    completion(client, "abc", 4)
    r = httpx.get(f"{srv.url}/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    m = parse_prometheus(r.text)
    for name in ("requests_total", "prompt_tokens_total", "completion_tokens_total", "tokens_per_second",
                 "queue_depth", "running_sequences", "expert_cache_hit_rate", "prefetch_precision",
                 "expert_bytes_moved_total", "expert_stall_seconds_total"):
        assert f"# TYPE moe_serve_{name} " in r.text, name
        assert any(k.split("{")[0] == f"moe_serve_{name}" for k in m), name
    assert m['moe_serve_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert 0 <= m["moe_serve_expert_cache_hit_rate"] <= 1 and m["moe_serve_completion_tokens_total"] >= 4
