"""`moe serve` life cycle: a client that disconnects frees its row, a full queue answers 429,
failures answer 500 and the server keeps serving, shutdown within its bound, SIGTERM on the real
CLI, EOS from the checkpoint, a Hugging Face directory with its tokenizer and chat template.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from moe_runtime.core.cli import build_parser, main as moe_main
from tests.serve_support import (CTX, KEY, NAME, ThreadServer, assert_error, ckpt, client, completion,  # noqa: F401
                                 slow_steps, srv, wait_for)


def test_disconnect_mid_stream_frees_the_slot(srv):
    real = slow_steps(srv.ctx, 0.05)  # 100 tokens would take 5 s: the disconnect comes well before
    try:
        before = srv.metrics().get('moe_serve_finished_total{reason="cancelled"}', 0)
        body = {"model": NAME, "prompt": "while True:", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
            lines = r.iter_lines()
            assert next(l for l in lines if l.startswith("data: "))
            assert srv.metrics()["moe_serve_running_sequences"] == 1
        wait_for(lambda: srv.metrics()["moe_serve_running_sequences"] == 0, "the row was not freed")
        m = srv.metrics()
        assert m['moe_serve_finished_total{reason="cancelled"}'] == before + 1
        assert srv.ctx.scheduler.batch.free_rows == srv.ctx.scheduler.max_batch
    finally:
        srv.ctx.scheduler.batch.step = real


def test_disconnect_while_waiting_for_a_whole_answer_frees_the_slot(srv):
    real = slow_steps(srv.ctx, 0.05)
    try:
        before = srv.metrics().get('moe_serve_finished_total{reason="cancelled"}', 0)
        body = {"model": NAME, "prompt": "import", "max_tokens": 100, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=httpx.Timeout(10, read=0.5))
        wait_for(lambda: srv.metrics().get('moe_serve_finished_total{reason="cancelled"}', 0) == before + 1,
                 "the abandoned request was not cancelled")
        assert srv.metrics()["moe_serve_running_sequences"] == 0
    finally:
        srv.ctx.scheduler.batch.step = real


def test_a_client_that_left_is_counted_499_not_as_a_server_error(srv):
    real = slow_steps(srv.ctx, 0.05)
    key = 'moe_serve_requests_total{endpoint="/v1/completions",status="%d"}'
    try:
        before = srv.metrics()
        body = {"model": NAME, "prompt": "import", "max_tokens": 100, "temperature": 0}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=httpx.Timeout(10, read=0.5))
        wait_for(lambda: srv.metrics().get(key % 499, 0) == before.get(key % 499, 0) + 1,
                 f"the abandoned request was not counted as 499: {srv.metrics()}")
        assert srv.metrics().get(key % 503, 0) == before.get(key % 503, 0)
    finally:
        srv.ctx.scheduler.batch.step = real


def test_queued_requests_whose_clients_left_give_up_their_place(ckpt):
    """--max-batch 1 --max-queue 2: one long request runs, two clients queue and give up (one on
    a stream, one waiting for a whole answer): the queue empties, and a live client is queued,
    not refused with 429."""
    s = ThreadServer(ckpt, "--max-batch", "1", "--max-queue", "2")
    slow_steps(s.ctx, 0.1)  # the first request would take 12 s: its client leaves long before
    health = lambda: httpx.get(f"{s.url}/health").json()  # noqa: E731
    body = {"model": NAME, "prompt": "abc", "max_tokens": 120, "temperature": 0}
    try:
        with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}, timeout=30) as first:
            lines = first.iter_lines()
            next(lines)
            gave_up: list[type] = []

            def impatient() -> None:  # waits for a whole answer, gives up after 1 s
                try:
                    httpx.post(f"{s.url}/v1/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
                except httpx.ReadTimeout as e:
                    gave_up.append(type(e))

            with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}, timeout=30) as r:
                assert r.status_code == 200  # a stream's headers come at once; it waits in the queue
                other = threading.Thread(target=impatient)
                other.start()
                wait_for(lambda: health()["queued"] == 2, "the two requests did not queue")
            other.join(30)  # both clients have gone now
            assert gave_up == [httpx.ReadTimeout]
            wait_for(lambda: health()["queued"] == 0, f"requests whose clients left kept their place: {health()}",
                     timeout=5.0)  # well before the first request ends by itself (120 steps of 0.1 s)
            live: list[httpx.Response] = []
            t = threading.Thread(target=lambda: live.append(
                httpx.post(f"{s.url}/v1/completions", json={**body, "max_tokens": 2}, timeout=30)))
            t.start()
            wait_for(lambda: health()["queued"] == 1, "the live request did not queue")
            assert health()["running"] == 1
        t.join(30)  # the long stream's client left too: its row is freed, the live request runs
        assert live and live[0].status_code == 200 and live[0].json()["usage"]["completion_tokens"] == 2
        m = s.metrics()
        assert m['moe_serve_finished_total{reason="cancelled"}'] == 3
        assert m['moe_serve_requests_total{endpoint="/v1/completions",status="499"}'] == 1
        assert 'moe_serve_requests_total{endpoint="/v1/completions",status="429"}' not in m
    finally:
        s.stop()


def test_shutdown_cancels_running_requests_within_the_bound(ckpt):
    s = ThreadServer(ckpt, "--max-batch", "2")
    slow_steps(s.ctx, 0.05)
    got: list[str] = []

    def stream() -> None:
        body = {"model": NAME, "prompt": "abc", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
            got.extend(l for l in r.iter_lines() if l)

    t = threading.Thread(target=stream)
    t.start()
    wait_for(lambda: s.ctx.scheduler.running == 1, "the request did not start")
    t0 = time.monotonic()
    s.ctx.closing = True
    s.ctx.scheduler.close(0.2)  # what SIGTERM starts: drain 0.2 s, then cancel
    t.join(10)
    s.stop()
    assert time.monotonic() - t0 < 5
    assert got[-1] == "data: [DONE]" and "shutting down" in got[-2], got[-3:]
    assert not s.thread.is_alive()


def test_sigterm_keeps_listening_with_503_while_draining_and_a_second_signal_cancels(ckpt):
    s = ThreadServer(ckpt, "--max-batch", "2")
    slow_steps(s.ctx, 0.05)
    got: list[str] = []

    def stream() -> None:
        body = {"model": NAME, "prompt": "abc", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
            got.extend(l for l in r.iter_lines() if l)

    t = threading.Thread(target=stream)
    t.start()
    try:
        wait_for(lambda: s.ctx.scheduler.running == 1, "the request did not start")
        s.server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        r = httpx.get(f"{s.url}/health", timeout=5)  # a new connection: the listener is still open
        assert r.status_code == 503 and r.json()["status"] == "shutting down"
        r = httpx.post(f"{s.url}/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 2}, timeout=5)
        assert_error(r, 503, None, "a request while draining")
        assert t.is_alive() and s.ctx.scheduler.running == 1, "the running request did not keep running"
        t0 = time.monotonic()
        s.server.handle_exit(signal.SIGTERM, None)  # the second signal: cancel now
        t.join(10)
        s.thread.join(10)
        assert time.monotonic() - t0 < 5 and not s.thread.is_alive()
        assert got[-1] == "data: [DONE]" and "shutting down" in got[-2], got[-3:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.url}/health", timeout=5)
    finally:
        s.stop()


def test_serve_on_a_port_in_use_fails_before_loading_the_model(ckpt, capsys, monkeypatch):
    import moe_runtime.offload.serve.server as server_module
    monkeypatch.setattr(server_module, "build_context", lambda args: pytest.fail("loaded the model first"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert moe_main(["serve", "--checkpoint", str(ckpt), "--gpu-expert-slots", "4", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moe serve: error: cannot listen on 127.0.0.1:{port}: "), err
    assert "in use" in err[0] and "--port" in err[0], err


def test_cli_serve_and_sigterm_finishes_running_stream(ckpt):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "moe_runtime", "serve", "--checkpoint", str(ckpt), "--gpu-expert-slots",
                             "4", "--device", "cpu", "--port", "0", "--shutdown-timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["event"] == "serving" and first["url"].startswith("http://127.0.0.1:")
        assert isinstance(first["pass_threads"], list) and first["cuda_graphs"] is False
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
        slow_steps(s.ctx, 0.05)
        body = {"model": NAME, "prompt": "abc", "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # kept: a dropped iterator closes the connection (a disconnect)
            next(lines)
            waiting = threading.Thread(target=lambda: httpx.post(f"{s.url}/v1/completions", timeout=30,
                                                                 json={**body, "stream": False, "max_tokens": 2}))
            waiting.start()
            wait_for(lambda: s.metrics()["moe_serve_queue_depth"] == 1, "the second request did not queue")
            assert_error(httpx.post(f"{s.url}/v1/completions", json=body, timeout=30), 429, "queue_full", "full queue")
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
    server = ThreadServer(None, args=args)
    try:
        port = server.port
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        r = c.chat.completions.create(model="mixtral-tiny", messages=messages, max_tokens=8, temperature=0,
                                      extra_body={"return_token_ids": True}).model_dump()["choices"][0]
        assert r["prompt_token_ids"] == tok.encode(rendered).ids
        assert r["token_ids"] == want
        assert r["message"]["content"] == tok.decode(want)
    finally:
        server.stop()


def test_cli_registration_defaults_and_argument_errors(ckpt, capsys, monkeypatch):
    from moe_runtime.core import cli
    # `serve` comes from the entry points; one whose package is absent (a stale entry point) is skipped
    declared = cli.declared_entry_points
    monkeypatch.setattr(cli, "declared_entry_points", lambda group: {**declared(group), "ghost": "no_such_pkg.cli:register"})
    help_text = build_parser().format_help()
    assert "serve" in help_text and "ghost" not in help_text
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    serve_help = " ".join(capsys.readouterr().out.split())
    assert "tokenizer.json when it has one" in serve_help and "with tokenizer.json" not in serve_help  # optional
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
        wait_for(lambda: batch.free_rows == srv.ctx.scheduler.max_batch, "a row stayed taken")


