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


def test_a_max_model_len_beyond_the_models_positions_is_refused_before_loading(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text('{"text_config": {"max_position_embeddings": 512}}')
    code, out, _ = launch("--model", str(folder), "--max-model-len", "1k")
    assert code != 0 and "--max-model-len 1000 is more than the model's" in out
    assert "max_position_embeddings (512" in out and "model loaded" not in out


def test_a_missing_media_folder_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    missing = tmp_path / "no-such-media"
    code, out, _ = launch("--model", str(folder), "--allowed-local-media-path", str(missing))
    assert code != 0 and f"--allowed-local-media-path '{missing}' does not exist" in out
