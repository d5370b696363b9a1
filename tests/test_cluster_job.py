"""`ray job submit` against a local Ray head started here on loopback addresses only: the README's
command (its "On a Ray cluster" block, verbatim except ports and the storage directory) trains on
2 workers and writes checkpoints to --storage, which then load in one process.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_runtime.core.checkpoint import Checkpoint, latest_checkpoint

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_job_commands() -> str:
    """The README job section's `export` and `ray job submit ...` lines (continuations joined)."""
    text = (REPO / "README.md").read_text()
    block = text.split("### On a Ray cluster", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = block.replace("\\\n", " ").splitlines()
    cmd = [ln for ln in lines if ln.startswith(("export ", "ray job submit"))]
    assert len(cmd) == 2 and cmd[1].startswith("ray job submit"), block
    return "\n".join(cmd)


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` on 127.0.0.1 with free ports; ended by its process group id."""
    venv_bin = Path(sys.executable).parent
    ports = {k: _free_port() for k in ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                                        "metrics-export-port", "runtime-env-agent-port", "dashboard-agent-grpc-port")}
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ['PATH']}", "RAY_DEDUP_LOGS": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("PYTHONPATH", None)  # as on a fresh clone: the job imports the uploaded working dir
    args = [str(venv_bin / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host",
            "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]]
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=open(tmp_path / "head.log", "w"),
                            stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        _wait_for_dashboard(address, env, proc, tmp_path / "head.log")
        yield address, env
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_for_dashboard(address: str, env: dict, proc: subprocess.Popen, log: Path) -> None:
    for _ in range(40):
        if proc.poll() is not None:
            pytest.fail(f"ray start exited: {log.read_text()[-2000:]}")
        r = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "list", "--address", address],
                           env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(2)
    pytest.fail(f"the Ray head did not answer at {address}")


def test_readme_job_command_writes_checkpoints_to_storage(ray_head, tmp_path):
    address, env = ray_head
    storage = tmp_path / "storage"
    cmd = readme_job_commands()
    assert '--storage "$PWD/runs"' in cmd and "--workers 2 --ep 2" in cmd and "http://127.0.0.1:8265" in cmd
    cmd = cmd.replace('"$PWD/runs"', str(storage)).replace("http://127.0.0.1:8265", address)
    r = subprocess.run(["bash", "-ec", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert re.search(r"succeeded", out), out[-2000:]
    name = re.search(r"--name (\S+)", cmd).group(1)  # its own run dir: not the quick start's runs/tiny
    ck = Checkpoint(latest_checkpoint(storage / name))
    assert ck.step == 20 and ck.manifest.layout == {"world": 2, "ep": 2}
    assert (storage / name / "metrics.jsonl").is_file()
