"""`moe serve` over real HTTP, as an OpenAI client sees it: uvicorn on an ephemeral loopback port
(tests/serve_support.py), the official `openai` client. Greedy and seeded answers equal `moe
generate`'s tokens, streamed and not; chat uses the checkpoint's template; concurrent requests
share decode steps; every error is an OpenAI-style 4xx and the next request still succeeds.
"""
from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from moe_runtime.core.cli import main as moe_main
from moe_runtime.offload.serve.metrics import parse_prometheus
from moe_runtime.offload.serve.app import MAX_BODY_BYTES
from tests.serve_support import (CTX, KEY, NAME, RawHTTP, ThreadServer, assert_error, ckpt, client,  # noqa: F401
                                 completion, generate_tokens, post, srv)


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
    # types are strict, as the OpenAI API's are: no coercion from strings, bools or floats
    ("max_tokens as a string", {"prompt": "a", "max_tokens": "5"}, 400, None),
    ("max_tokens as a bool", {"prompt": "a", "max_tokens": True}, 400, None),
    ("max_tokens as a float", {"prompt": "a", "max_tokens": 2.0}, 400, None),
    ("stream as a string", {"prompt": "a", "stream": "yes"}, 400, None),
    ("prompt of bools", {"prompt": [True, False]}, 400, None),
    ("seed as a string", {"prompt": "a", "seed": "7"}, 400, None),
    ("temperature as a bool", {"prompt": "a", "temperature": True}, 400, None),
    ("repetition_penalty Infinity", {"prompt": "a", "repetition_penalty": float("inf")}, 400, None),
    ("top_p NaN", {"prompt": "a", "top_p": float("nan")}, 400, None),
]
CHAT_ERRORS = [
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter"),
    ("chat logprobs", {"logprobs": True}, 400, "unsupported_parameter"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "unsupported_parameter"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "a"}]}, 400, None),
    ("content as a number", {"messages": [{"role": "user", "content": 5}]}, 400, None),
    ("max_completion_tokens as a string", {"max_completion_tokens": "5"}, 400, None),
    ("chat max_tokens past the context", {"max_tokens": CTX}, 400, "context_length_exceeded"),
]


@pytest.mark.parametrize("what,body,status,code", ERRORS, ids=[e[0] for e in ERRORS])
def test_completion_errors_are_openai_style_and_the_server_keeps_serving(srv, client, what, body, status, code):
    assert_error(post(srv, "completions", json.dumps({"model": NAME, **body}).encode()), status, code, what)
    assert completion(client, "ok", 3).choices[0].finish_reason == "length"


@pytest.mark.parametrize("what,body,status,code", CHAT_ERRORS, ids=[e[0] for e in CHAT_ERRORS])
def test_chat_errors(srv, client, what, body, status, code):
    base = {"model": NAME, "messages": [{"role": "user", "content": "a"}]}
    assert_error(post(srv, "chat/completions", json.dumps({**base, **body}).encode()), status, code, what)
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}], max_tokens=2)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_bodies(srv, client, raw):
    assert_error(post(srv, "completions", raw), 400, None, repr(raw))
    assert completion(client, "ok", 2).usage.completion_tokens == 2


def test_strict_types_name_the_field_and_what_it_takes(srv):
    r = post(srv, "completions", json.dumps({"model": NAME, "prompt": "a", "max_tokens": "5"}).encode())
    assert_error(r, 400, None, "max_tokens as a string")
    assert r.json()["error"]["param"] == "max_tokens" and 'got "5"' in r.json()["error"]["message"]
    r = post(srv, "completions", json.dumps({"model": NAME, "prompt": [True, False]}).encode())
    assert r.json()["error"]["param"] == "prompt" and "expected str or list[int]" in r.json()["error"]["message"]
    # 1e999 is valid JSON that Python reads as inf; NaN / Infinity are not JSON at all
    for raw in (b'"repetition_penalty": 1e999', b'"repetition_penalty": Infinity', b'"top_p": NaN'):
        body = b'{"model": "%s", "prompt": "a", %s}' % (NAME.encode(), raw)
        assert_error(post(srv, "completions", body), 400, None, raw.decode())


# ---------------------------------------------------------------- bodies a client would not send
LONE_SURROGATE = [
    ("completions", b'{"model": "%s", "prompt": "ab\\ud800cd", "max_tokens": 2}', "prompt"),
    ("chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": "ab\\udc00"}]}',
     "messages.0.content"),
    ("chat/completions", b'{"model": "%s", "messages": [{"role": "user", "content": [{"type": "text", '
                         b'"text": "\\ud83d"}]}]}', "messages.0.content.0.text"),
    ("completions", b'{"model": "%s\\udfff", "prompt": "a"}', "model"),
]


@pytest.mark.parametrize("path,template,param", LONE_SURROGATE, ids=[p for _, _, p in LONE_SURROGATE])
def test_lone_surrogate_is_a_400_and_the_connection_serves_the_next_request(srv, path, template, param):
    conn = RawHTTP(srv.port)
    try:
        status, _, body = conn.post(f"/v1/{path}", template % NAME.encode())
        err = json.loads(body)["error"]
        assert status == 400 and err["param"] == param and "surrogate" in err["message"], (status, body)
        ok = json.dumps({"model": NAME, "prompt": "ab\U0001f600", "max_tokens": 2}).encode()  # a surrogate pair is fine
        status, _, body = conn.post("/v1/completions", ok)
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 2, (status, body)
    finally:
        conn.close()


@pytest.mark.parametrize("depth", [100_000, 200])
def test_deeply_nested_json_is_a_400_and_the_connection_serves_the_next_request(srv, depth):
    conn = RawHTTP(srv.port)
    try:
        deep = b'{"model": "%s", "prompt": "a", "user": %s%s}' % (NAME.encode(), b"[" * depth, b"]" * depth)
        status, _, body = conn.post("/v1/completions", deep)
        assert status == 400 and "nests too deeply" in json.loads(body)["error"]["message"], (status, body[:200])
        ok = json.dumps({"model": NAME, "prompt": "a", "max_tokens": 2}).encode()
        status, _, body = conn.post("/v1/completions", ok)
        assert status == 200, (status, body)
    finally:
        conn.close()


def test_a_declared_body_over_the_limit_is_refused_before_it_is_read(srv):
    conn = RawHTTP(srv.port, timeout=10)
    try:
        conn.head("/v1/completions", length=256 * 2**20)  # 256 MiB announced; only 64 KiB ever sent
        conn.sock.sendall(b"{" + b" " * 65535)
        status, headers, body = conn.response()
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large", (status, body)
        assert headers.get("connection") == "close" and conn.at_eof()
    finally:
        conn.close()
    ok = json.dumps({"model": NAME, "prompt": "a", "max_tokens": 2}).encode()
    assert post(srv, "completions", ok).status_code == 200  # a new connection is served


def test_a_chunked_body_is_refused_when_it_passes_the_limit(srv):
    conn = RawHTTP(srv.port, timeout=10)
    piece = 2**16
    try:
        conn.head("/v1/completions", chunked=True)
        for _ in range(MAX_BODY_BYTES // piece):  # exactly the limit: still read
            conn.sock.sendall(b"%x\r\n%s\r\n" % (piece, b" " * piece))
        conn.sock.sendall(b"1\r\n ")  # one byte more, and then nothing: no terminating chunk follows
        status, headers, body = conn.response()
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large", (status, body)
        assert headers.get("connection") == "close" and conn.at_eof()
    finally:
        conn.close()
    big = b'{"model": "%s", "prompt": "a", "max_tokens": 2, "user": "%s"}' % (NAME.encode(),
                                                                           b"u" * (MAX_BODY_BYTES - 100))
    assert post(srv, "completions", big).status_code == 200  # just under the limit: served


def test_openai_client_raises_on_unknown_model(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=NAME, prompt="a", max_tokens=CTX)




def test_unexpected_errors_are_500_json_and_keep_the_connection(srv, client):
    real = srv.ctx.render_chat
    srv.ctx.render_chat = lambda messages: 1 / 0
    conn = RawHTTP(srv.port)
    chat = json.dumps({"model": NAME, "messages": [{"role": "user", "content": "a"}], "max_tokens": 2}).encode()
    try:
        with pytest.raises(openai.InternalServerError, match="ZeroDivisionError"):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "a"}], max_tokens=2)
        status, _, body = conn.post("/v1/chat/completions", chat)
        assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
    finally:
        srv.ctx.render_chat = real
    try:
        assert conn.post("/v1/chat/completions", chat)[0] == 200  # the same keep-alive connection
    finally:
        conn.close()
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


def test_chunked_prefill_greedy_equals_moe_generate(ckpt, tmp_path, capsys):
    """--max-prefill-tokens 3: prompts go in 3-token chunks between decode steps, newcomers
    sharing a pass; every answer (three at once) equals `moe generate`'s, and the prompt tokens
    are all counted."""
    prompts = [("def main(args):", 12), ("class Tokenizer(object):", 9), ("x", 10)]
    want = [generate_tokens(ckpt, tmp_path, p, n) for p, n in prompts]
    capsys.readouterr()
    s = ThreadServer(ckpt, "--api-key", KEY, "--max-batch", "3", "--max-prefill-tokens", "3")
    try:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        results: dict[int, list[int]] = {}

        def one(i: int) -> None:
            chunks = completion(c, prompts[i][0], prompts[i][1], stream=True)
            results[i] = sum((ch.model_dump()["choices"][0]["token_ids"] for ch in chunks), [])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [results.get(i) for i in range(len(prompts))] == want, "chunked prefill changed an answer"
        assert s.ctx.scheduler.batch.max_prefill_tokens == 3
        assert s.metrics()["moe_serve_prompt_tokens_total"] == sum(len(p) for p, _ in prompts)
    finally:
        s.stop()
