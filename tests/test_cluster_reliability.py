"""Issue 22, items 1-7: a cluster run (`moe train --workers N`, its own embedded Ray) under signals,
a dead driver, --no-resume, two runs on one machine, a worker stopped during setup, and what it
binds and prints.

Each slow test drives real `moe train --workers 2` processes (their own embedded Ray), except the
setup-hang test, which uses the session's Ray from the pytest process.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moe_runtime.core.checkpoint import Checkpoint, latest_checkpoint
from tests.test_cluster_training import tiny_run, write_text_corpus

REPO = Path(__file__).resolve().parent.parent
NOISE = ("SIGTERM received", "Gracefully aborting", "PreemptionWatcher", "PlacementGroupCleaner",
         "Token authentication", "multiple active Ray instances", "\x1b[", "Reporting training result",
         "Failed to send resource request")


# ---------------------------------------------------------------- helpers
def _train_cmd(storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moe_runtime", "train", "--preset", "tiny", "--workers", "2", "--ep", "2",
            "--storage", str(storage), "--no-progress", *extra]


def _launch(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_DEDUP_LOGS")}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log.with_suffix(".out"), "w"),
                            stderr=open(log.with_suffix(".err"), "w"), start_new_session=True)


def _output(log: Path) -> tuple[str, str]:
    return log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run_dir.glob("step_*") if p.is_dir()) if run_dir.is_dir() else []


def _wait_for(pred, proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} early:\n" + "\n".join(_output(log))[-3000:])
        if time.monotonic() - t0 > timeout:
            pytest.fail("timed out waiting:\n" + "\n".join(_output(log))[-3000:])
        time.sleep(0.2)


def _descendants(pid: int) -> set[int]:
    """pid and every process below it (Ray's gcs_server, raylet, workers...), from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def _kill_tree(pids: set[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket the processes hold."""
    inode_pid = {}
    for p in pids:
        try:
            for fd in Path(f"/proc/{p}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inode_pid[link[8:-1]] = p
        except OSError:
            continue
    out = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inode_pid:  # 0A: LISTEN
                continue
            addr, port = f[1].split(":")
            raw = bytes.fromhex(addr)
            if v6:  # four little-endian 32-bit words
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                host = ("127.0.0.1" if raw[:12] == b"\0" * 10 + b"\xff\xff" and raw[12:] == b"\x7f\0\0\x01"
                        else "::1" if raw == b"\0" * 15 + b"\x01" else raw.hex())
            else:
                host = ".".join(str(b) for b in raw[::-1])
            out.append((inode_pid[f[9]], f"{host}:{int(port, 16)}"))
    return out


class Checks(list):
    """Failed checks, collected, so that one (slow) run names every item it breaks."""

    def __call__(self, ok: bool, what: str) -> bool:
        if not ok:
            self.append(what)
        return bool(ok)

    def done(self) -> None:
        assert not self, "\n".join(f"- {c}" for c in self)


def _no_noise(check: Checks, out: str, err: str, who: str = "") -> None:
    text = out + err
    for bad in NOISE:
        check(bad not in text, f"item 21{who}: {bad!r} in the output")
    # no traceback of ours or of the driver; a Ray actor's own error report (prefixed "(Name pid=...)",
    # e.g. a transient controller timeout on an overloaded machine) is one of Ray's real errors
    check(not [ln for ln in text.splitlines() if "Traceback" in ln and not ln.startswith("(")],
          f"item 2/21{who}: a traceback of the driver in the output")


def _one_line_each(check: Checks, out: str, err: str) -> None:
    """Each rank-0 line once on the console (stdout and stderr together: Ray Train's print patch sent
    a worker's print to stdout and, through its logger, to stderr)."""
    lines = [ln for ln in (out + err).splitlines() if "[cluster rank 0]" in ln]
    if check(bool(lines), f"item 5: no [cluster rank 0] line in the output: {out[-1000:]}"):
        dup = {ln for ln in lines if lines.count(ln) > 1}
        check(not dup, f"item 5: printed more than once: {sorted(dup)[:3]}")


# ---------------------------------------------------------------- one process: --no-resume (fast)
def test_no_resume_keeps_the_previous_runs_checkpoints_one_process(tmp_path, capsys):
    from moe_runtime.core.train import Trainer
    data = write_text_corpus(tmp_path / "text.txt")
    out = tmp_path / "run"
    Trainer(tiny_run(max_steps=4, ckpt_interval=1, keep_checkpoints=2), data=data, out_dir=out, progress=False,
            plots=False).fit()
    before = {p.name: (p / "manifest.msgpack").read_bytes() for p in (out / "checkpoints").glob("step_*")}
    assert sorted(before) == ["step_00000003", "step_00000004"]
    Trainer(tiny_run(max_steps=2, ckpt_interval=1, keep_checkpoints=2), data=data, out_dir=out, progress=False,
            plots=False).fit(resume=False)
    printed = capsys.readouterr().out
    moved = re.search(r"--no-resume: moved the previous run's checkpoints and metrics.jsonl to (\S+) \(kept", printed)
    assert moved, printed
    aside = Path(moved.group(1))
    assert {p.name: (p / "manifest.msgpack").read_bytes() for p in (aside / "checkpoints").glob("step_*")} == before
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    assert Checkpoint(latest_checkpoint(out / "checkpoints")).step == 2


# ---------------------------------------------------------------- cluster runs (slow)
@pytest.mark.slow
def test_ctrl_c_prints_the_resume_line_exits_130_binds_loopback_and_no_resume_keeps_checkpoints(tmp_path):
    """Items 2, 5, 7, 21 and 4: Ctrl-C of `moe train --workers 2` prints where it stopped and what a
    rerun resumes from, exits 130, without Ray's stack noise; every rank-0 line once; every socket
    the run listens on is on 127.0.0.1; then --no-resume moves the checkpoints aside, not deletes."""
    storage, log = tmp_path / "store", tmp_path / "a"
    check = Checks()
    proc = _launch(_train_cmd(storage, "--max-steps", "400", "--ckpt-interval", "2"), log)
    run_dir = storage / "tiny"
    tree: set[int] = set()
    try:
        _wait_for(lambda: len(_steps(run_dir)) >= 1 and "[cluster rank 0] step" in _output(log)[0], proc, log)
        tree = _descendants(proc.pid)
        listening = _listening(tree)
        assert listening, "found no listening socket of the run's processes"
        wide = [(p, a) for p, a in listening if not a.startswith(("127.0.0.1:", "::1:"))]
        # the one exception (README): torch's TCPStore, which Ray Train's init_process_group opens on
        # rank 0 and torch binds to every interface; nothing of Ray's listens beyond loopback
        check(len(wide) <= 1 and all("RayTrainWorker" in _cmdline(p) for p, _ in wide),
              f"item 7: listening beyond loopback: {[(p, a, _cmdline(p)[:40]) for p, a in wide]} "
              f"(of {len(listening)})")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=180)
    finally:
        _kill_tree(tree | _descendants(proc.pid))
    out, err = _output(log)
    check(rc == 130, f"item 2: Ctrl-C exit status {rc}, not 130")
    last = err.strip().splitlines()[-1] if err.strip() else ""
    m = re.fullmatch(r"moe train: interrupted \(Ctrl-C\) at step (\d+); rerun the same command \(same --storage and "
                     r"--name\) to resume from (\S+/step_\d{8})", last)
    if check(bool(m), f"item 2: last line of stderr is not the resume line: {last!r}"):
        check(Path(m.group(2)).parent == run_dir and Checkpoint(m.group(2)).step == max(_steps(run_dir)),
              f"item 2: the line names {m.group(2)}, not the newest checkpoint (steps {_steps(run_dir)})")
    _no_noise(check, out, err)
    _one_line_each(check, out, err)

    before = {s: (run_dir / f"step_{s:08d}" / "manifest.msgpack").read_bytes() for s in _steps(run_dir)}
    log2 = tmp_path / "b"
    proc = _launch(_train_cmd(storage, "--max-steps", "4", "--ckpt-interval", "2", "--no-resume"), log2)
    try:
        assert proc.wait(timeout=400) == 0, "\n".join(_output(log2))[-3000:]
    finally:
        _kill_tree(_descendants(proc.pid))
    out2, err2 = _output(log2)
    m = re.search(r"--no-resume: moved the previous run's (\d+) checkpoint\(s\) and \S.* to (\S+) \(kept", out2)
    if check(bool(m) and int(m.group(1)) == len(before), f"item 4: no line saying where the {len(before)} "
                                                         f"previous checkpoints went: {out2[-1500:]}"):
        aside = Path(m.group(2))
        check({int(p.name[5:]): (p / "manifest.msgpack").read_bytes() for p in aside.glob("step_*")} == before,
              "item 4: the previous checkpoints are not all in the directory the line names")
    check(_steps(run_dir) == [2, 4], f"item 4: the run directory holds steps {_steps(run_dir)}, not [2, 4]")
    check("resumed" not in (run_dir / "metrics.jsonl").read_text(), "item 4: the --no-resume run resumed")
    check.done()


@pytest.mark.slow
def test_dead_driver_writes_no_further_checkpoint_and_pruning_sees_every_checkpoint(tmp_path):
    """Item 3: SIGKILL of the driver: its workers stop before another checkpoint; the rerun resumes
    and keeps exactly keep_checkpoints (2) step directories in the run directory."""
    storage, log = tmp_path / "store", tmp_path / "a"
    run_dir = storage / "tiny"
    proc = _launch(_train_cmd(storage, "--max-steps", "400", "--ckpt-interval", "1"), log)
    tree: set[int] = set()
    try:
        _wait_for(lambda: len(_steps(run_dir)) >= 2, proc, log)
        tree = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        at_kill = max(_steps(run_dir))
        proc.wait()
        t0 = time.monotonic()
        workers = {p for p in tree if "RayTrainWorker" in _cmdline(p)}
        while any(_alive(p) for p in workers) and time.monotonic() - t0 < 60:
            time.sleep(0.5)
        late = [s for s in _steps(run_dir) if s > at_kill + 1]  # +1: one checkpoint may be in flight at the kill
    finally:
        _kill_tree(tree | _descendants(proc.pid))
    # (the workers' "the driver (pid N) is gone: stopping before ..." line goes to Ray's worker logs:
    # the driver that would print it is dead)
    end = max(_steps(run_dir)) + 3
    log2 = tmp_path / "b"
    proc = _launch(_train_cmd(storage, "--max-steps", str(end), "--ckpt-interval", "1"), log2)
    try:
        assert proc.wait(timeout=400) == 0, "\n".join(_output(log2))[-3000:]
    finally:
        _kill_tree(_descendants(proc.pid))
    check = Checks()
    check(not late, f"item 3: checkpoints written after the driver died at step {at_kill}: {late}")
    check(_steps(run_dir) == [end - 1, end], f"item 3: after the rerun the run directory holds steps "
                                             f"{_steps(run_dir)}, not the newest 2 ([{end - 1}, {end}])")
    check.done()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_two_runs_on_one_machine_each_own_ray_and_sigterm_exits_143(tmp_path):
    """Items 6, 2 (and 5, 21): two cluster runs at once each start their own Ray on 127.0.0.1 and say
    so, with no 'multiple active Ray instances'; SIGTERM of one prints the resume line and exits 143."""
    logs, procs, trees = [tmp_path / "x", tmp_path / "y"], [], set()
    cmds = [_train_cmd(tmp_path / "sx", "--max-steps", "6", "--ckpt-interval", "2"),
            _train_cmd(tmp_path / "sy", "--max-steps", "400", "--ckpt-interval", "2")]
    for cmd, log in zip(cmds, logs):
        procs.append(_launch([c for c in cmd if c != "--no-progress"], log))
    try:
        _wait_for(lambda: len(_steps(tmp_path / "sy" / "tiny")) >= 1, procs[1], logs[1])
        trees = _descendants(procs[0].pid) | _descendants(procs[1].pid)
        procs[1].send_signal(signal.SIGTERM)
        rc_y = procs[1].wait(timeout=180)
        rc_x = procs[0].wait(timeout=400)
    finally:
        _kill_tree(trees | _descendants(procs[0].pid) | _descendants(procs[1].pid))
    (out_x, err_x), (out_y, err_y) = _output(logs[0]), _output(logs[1])
    check = Checks()
    check(rc_x == 0, f"item 6: the run left alone exited {rc_x}: {err_x[-1500:]}")
    check(rc_y == 143, f"item 2: SIGTERM exit status {rc_y}, not 143")
    last = err_y.strip().splitlines()[-1] if err_y.strip() else ""
    check(re.fullmatch(r"moe train: interrupted \(SIGTERM\) at step \d+; rerun .* to resume from \S+/step_\d{8}",
                       last), f"item 2: last line after SIGTERM is not the resume line: {last!r}")
    for who, out, err in ((" (run x)", out_x, err_x), (" (run y)", out_y, err_y)):
        check("[cluster] started a private Ray instance for this run, on 127.0.0.1 only" in out,
              f"item 6{who}: no line saying which Ray the run uses")
        check("multiple active Ray instances" not in out + err, f"item 6{who}: 'multiple active Ray instances'")
        _no_noise(check, out, err, who)
    _one_line_each(check, out_x, err_x)
    check.done()


@pytest.mark.slow
@pytest.mark.ray
def test_worker_stopped_during_group_start_is_named_and_retried(ray_local, tmp_path, capfd):
    """Item 1: SIGSTOP of the first RayTrainWorker as soon as it exists (Ray Train's worker start,
    before ranks exist, or just after): within --start-timeout one line names it (pid or rank) and
    the phase, it is killed, and Ray Train's retry (max_failures=1) finishes the run."""
    from ray._private import state as ray_state

    from moe_runtime.cluster.job import ClusterTrainer
    from moe_runtime.cluster.layout import ClusterConfig
    data = write_text_corpus(tmp_path / "text.txt")
    job = ray_local.get_runtime_context().get_job_id()
    known = {a for a, i in ray_state.actors().items() if i["ActorClassName"] == "RayTrainWorker"}
    stopped: list[tuple[int, float]] = []

    def stop_first_worker() -> None:
        t0 = time.monotonic()
        while not stopped and time.monotonic() - t0 < 300:
            for aid, info in ray_state.actors().items():
                if (aid not in known and info["ActorClassName"] == "RayTrainWorker" and info["Pid"]
                        and info["JobID"] == job):
                    os.kill(info["Pid"], signal.SIGSTOP)
                    stopped.append((info["Pid"], time.monotonic()))
                    return
            time.sleep(0.02)

    stopper = threading.Thread(target=stop_first_worker, daemon=True)
    stopper.start()
    # 60 s: on a busy 2-core machine a healthy worker can take over 20 s to start (Python, torch, Ray)
    cfg = ClusterConfig(workers=2, ep=2, storage=str(tmp_path / "store"), max_failures=1, collective_timeout_s=60,
                        start_timeout_s=60)
    try:
        s = ClusterTrainer(tiny_run(max_steps=2), cfg, data=data, progress=False, plots=False).fit()
    finally:
        for pid, _ in stopped:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    assert stopped, "no RayTrainWorker appeared"
    assert s["step"] == 2
    err = capfd.readouterr().err
    pid = stopped[0][0]
    named = re.search(rf"\[cluster\] (a worker with no rank yet \(pid {pid}\)|rank \d \(pid {pid}\)) is stopped "
                      rf"\(SIGSTOP\) in (Ray Train's worker start \(get_metadata\)|process-group init \(TorchConfig "
                      rf"rendezvous\)): no progress for \d+s \(--start-timeout 60\); killed it, Ray Train retries", err)
    hang_named = re.search(rf"rank \d stopped responding \(last seen in setup", err)
    assert named or hang_named, err[-3000:]


@pytest.mark.ray
def test_tests_ray_listens_on_loopback_only(ray_local):
    """Item 7 for the tests' own Ray (conftest.ray_local, started the way `moe train --workers N` starts
    its private one): the node address is 127.0.0.1 and no Ray process listens beyond loopback."""
    assert [n["NodeManagerAddress"] for n in ray_local.nodes() if n["Alive"]] == ["127.0.0.1"]
    listening = _listening(_descendants(os.getpid()))
    assert listening, "found no listening socket of the session's Ray"
    wide = [(p, a, _cmdline(p)[:60]) for p, a in listening if not a.startswith(("127.0.0.1:", "::1:"))]
    assert not wide, f"listening beyond loopback: {wide}"
