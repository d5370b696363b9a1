"""Shared pieces of the `moe serve` tests: a tiny checkpoint, uvicorn in a thread on an ephemeral
loopback port, the `openai` client fixtures, and small waiting / checking helpers."""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from moe_runtime.core.checkpoint import save_checkpoint  # noqa: E402
from moe_runtime.core.cli import build_parser, main as moe_main  # noqa: E402
from moe_runtime.core.config import MoEConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from moe_runtime.core.model import MoETransformer  # noqa: E402
from moe_runtime.offload.serve.metrics import parse_prometheus  # noqa: E402
from moe_runtime.offload.serve.server import build_context, make_server  # noqa: E402

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

    def __init__(self, ckpt: Path | None, *extra: str, args=None):
        """`moe serve` of `ckpt` with `extra` flags, or of parsed `args` (any `serve` command line)."""
        self.ctx = build_context(args if args is not None else serve_args(ckpt, *extra))
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


def post(srv, path: str, content: bytes) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/{path}", content=content, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})


def assert_error(r: httpx.Response, status: int, code: str | None, what: str) -> None:
    assert r.status_code == status, f"{what}: {r.status_code} {r.text}"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], f"{what}: {err}"
    assert err["code"] == code, f"{what}: code {err['code']!r}"


def slow_steps(ctx, delay: float):
    real = ctx.scheduler.batch.step

    def step():
        time.sleep(delay)
        return real()

    ctx.scheduler.batch.step = step
    return real


def wait_for(pred, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class RawHTTP:
    """One HTTP/1.1 keep-alive connection over a plain socket, for what clients do not send: a
    Content-Length with no body behind it, chunked bodies cut short, escapes httpx would not write;
    and to see that the same connection serves the next request."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def head(self, path: str, *, length: int | None = None, chunked: bool = False) -> None:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Authorization: Bearer {KEY}",
                 "Content-Type: application/json"]
        lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length}")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        self.head(path, length=len(body))
        self.sock.sendall(body)
        return self.response()

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body) of the next response (Content-Length framed)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        n = int(headers["content-length"])
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return int(status_line.split()[1]), headers, body

    def at_eof(self) -> bool:
        """True when the server has closed the connection (within the socket's timeout)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.buf += data
