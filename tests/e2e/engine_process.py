"""Start and stop a real `python -m core.launch` process for end-to-end tests."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EngineProcess:
    model: str
    args: list[str] = field(default_factory=list)
    http: bool = True
    api_key: str | None = None
    port: int = 0
    run_dir: str = ""
    proc: subprocess.Popen | None = None
    log_path: str = ""

    @property
    def scheme(self) -> str:
        return "https" if "--ssl-certfile" in self.args else "http"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def front(self) -> str:
        """The gateway's address, as the engine wrote it (ipc by default, tcp:// with --nnodes)."""
        written = Path(self.run_dir, "front")
        return written.read_text() if written.exists() else f"ipc://{self.run_dir}/front.sock"

    def start(self, timeout: float = 180.0) -> EngineProcess:
        self.port = self.port or free_port()
        self.run_dir = tempfile.mkdtemp(prefix="tessera-test-")
        # Kept until the test session ends (tests read engine.log after stop), then removed.
        atexit.register(shutil.rmtree, self.run_dir, True)
        cmd = [
            sys.executable,
            "-m",
            "core.launch",
            "--port",
            str(self.port),
            "--run-dir",
            self.run_dir,
            "--log-level",
            "warning",
            *self.args,
        ]
        if "--dtype" not in self.args:  # parity with transformers is checked in fp32
            cmd += ["--dtype", "float32"]
        if self.model:  # "" serves the embedded default model
            cmd += ["--model", self.model]
        if not self.http:
            cmd.append("--no-http")
        if self.api_key:
            cmd += ["--api-key", self.api_key]
        self.log_path = os.path.join(self.run_dir, "engine.log")
        log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited early:\n{self.log()}")
            if os.path.exists(os.path.join(self.run_dir, "front")):
                if not self.http or self._healthy():
                    return self
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"engine not ready in {timeout}s:\n{self.log()}")

    def _healthy(self) -> bool:
        try:
            # verify=False: a test engine serves HTTPS with the self-signed tests/assets/tls
            r = httpx.get(self.root_url + "/health", timeout=2, verify=False)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> int | None:
        return None if self.proc is None else stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL after 30 s; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def children_of(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            kids.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def actor_pids(eng: EngineProcess) -> dict[str, int]:
    """The engine's actor processes, by actor name."""
    assert eng.proc is not None
    out = {}
    for pid in children_of(eng.proc.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"core.actor" in cmd:
            out[cmd[-2].decode()] = pid
    return out
