"""Start-up mistakes are reported before any model loads: a busy port, a folder that is not a
checkpoint, a file that is not a .gguf (real `python -m core.launch` processes)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def launch(*args: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "core.launch", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def test_a_busy_port_is_named_before_the_model_loads(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # never read: the port check comes first
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, out, _ = launch("--model", str(folder), "--port", str(port))
    assert code != 0 and f"--port {port} on 127.0.0.1 is in use" in out
    assert "model loaded" not in out


@pytest.mark.parametrize("kind", ["empty-folder", "not-gguf"])
def test_a_path_that_holds_no_checkpoint_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    if kind == "empty-folder":
        path = tmp_path / "nothing"
        path.mkdir()
        words = "has no config.json"
    else:
        path = tmp_path / "weights.bin"
        path.write_bytes(b"\0")
        words = "is a file but not a .gguf"
    code, out, _ = launch("--model", str(path))
    assert code != 0 and words in out
