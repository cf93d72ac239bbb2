"""Two `core.launch` processes as two hosts on 127.0.0.1 (tcp:// stage sockets, torch.distributed
rendezvous at --master-addr/--master-port) form one tensor-parallel-2 engine: greedy outputs equal
transformers', over the SDK and HTTP; killing either launcher stops the other with a clear error
instead of hanging, and a request in flight on the leader ends with an error; hosts given
different engine flags refuse to start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.engine_process import ROOT, EngineProcess, stop_process
from tests.e2e.test_engine_matches_hf import engine_greedy, hf_greedy, random_prompts
from tests.fixtures.checkpoints import make_qwen2_checkpoint

STAGE_PORTS = 16  # the rendezvous port and the stage sockets after it (two ranks, one of each)


def free_port_run(n: int) -> int:
    """A port p with p .. p+n-1 all free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65536:
            continue
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no run of free ports")


def node_args(master_port: int) -> list[str]:
    return [
        "--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(master_port), "--max-model-len", "96", "--threads", "1",
    ]  # fmt: skip


class Worker:
    """The second host: `core.launch --node-rank 1`, which runs executor rank 1 only."""

    def __init__(self, model: Path, master_port: int, extra: list[str] | None = None) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="tessera-worker-")
        self.log_path = os.path.join(self.run_dir, "worker.log")
        cmd = [
            sys.executable, "-m", "core.launch", "--model", str(model), "--node-rank", "1",
            "--run-dir", self.run_dir, "--dtype", "float32", *node_args(master_port),
            *(extra or []),
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def wait_exit(proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until `proc` exited; fails the test if it is still running after `timeout`."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {timeout} s after the other host was killed (a hang)")
    return time.monotonic() - t0


@pytest.fixture
def two_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, EngineProcess, Worker]]:
    # the test fault hook (actors/execution/fault_hook.py): PATH.slow makes every step slow
    monkeypatch.setenv("TESSERA_FAULT_FILE", str(tmp_path / "fault"))
    ckpt = make_qwen2_checkpoint(
        tmp_path / "ckpt", num_attention_heads=3, num_key_value_heads=1, hidden_size=48
    )
    master_port = free_port_run(STAGE_PORTS)
    worker = Worker(ckpt, master_port)  # hosts may start in any order: the worker first here
    leader = EngineProcess(str(ckpt), [*node_args(master_port), "--node-rank", "0"])
    try:
        leader.start()
        yield ckpt, leader, worker
    finally:
        leader.stop()
        worker.stop()


def test_two_launchers_serve_as_one_tp2_engine_and_a_lost_worker_stops_the_leader(
    two_hosts: tuple[Path, EngineProcess, Worker],
) -> None:
    ckpt, leader, worker = two_hosts
    prompts = random_prompts(5, [7, 30, 12])
    got = engine_greedy(leader, prompts)
    body = {"model": str(ckpt), "prompt": prompts[1], "max_tokens": 12, "temperature": 0}
    answer = httpx.post(leader.base_url + "/completions", json=body | {"ignore_eos": True})
    assert "Tessera worker ready: node 1, ranks [1]" in worker.log()
    assert [g.token_ids for g in got] == hf_greedy(ckpt, prompts)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 12

    # a request in flight (every step slowed: 85 tokens take over 4 s), then the worker host's
    # launcher is killed outright
    (ckpt.parent / "fault.slow").write_text("0.05")
    long = {"model": str(ckpt), "prompt": prompts[0], "max_tokens": 85, "ignore_eos": True}
    with httpx.stream("POST", leader.base_url + "/completions", json=long | {"stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the stream has begun
        worker.proc.kill()
        rest = "\n".join(lines)  # it must end, not hang
    assert leader.proc is not None
    wait_exit(leader.proc, timeout=60)
    log = leader.log()
    assert leader.proc.returncode == 1
    assert "executor1 (on another host) sent no heartbeat" in log, log
    # the request ended at once, with the reason, instead of running to its end
    assert '"finish_reason":"length"' not in rest, rest
    assert "the engine stopped (executor1 (on another host)" in rest, (rest[-600:], log)


def test_the_worker_stops_when_the_leader_is_killed(
    two_hosts: tuple[Path, EngineProcess, Worker],
) -> None:
    _, leader, worker = two_hosts
    assert leader.proc is not None
    deadline = time.monotonic() + 60
    while "worker ready" not in worker.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    leader.proc.kill()
    wait_exit(worker.proc, timeout=30)
    assert worker.proc.returncode == 1
    assert "the leader went away; stopping" in worker.log()


def test_hosts_started_with_different_flags_are_refused(tmp_path: Path) -> None:
    ckpt = make_qwen2_checkpoint(tmp_path / "ckpt")
    master_port = free_port_run(STAGE_PORTS)
    worker = Worker(ckpt, master_port, ["--max-num-seqs", "8"])
    leader = EngineProcess(str(ckpt), [*node_args(master_port), "--node-rank", "0"], http=False)
    try:
        with pytest.raises(RuntimeError, match="started with different engine flags"):
            leader.start(timeout=120)
        wait_exit(worker.proc, timeout=30)
    finally:
        leader.stop()
        worker.stop()
    assert worker.proc.returncode == 1
