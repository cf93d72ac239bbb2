"""Process lifecycle: SIGTERM stops every actor and removes every socket file; a dead stateless
stage is restarted; junk on the front socket never takes the engine down."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import zmq

from tests.e2e.engine_process import EngineProcess, children_of

ARGS = [
    "--max-model-len",
    "128",
    "--kv-cache-memory",
    str(8 << 20),
    "--threads",
    "1",
    "--served-model-name",
    "m",
]


def chat(eng: EngineProcess) -> httpx.Response:
    return httpx.post(
        eng.base_url + "/chat/completions",
        timeout=60,
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )


def actor_pids(eng: EngineProcess) -> dict[str, int]:
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


def test_sigterm_leaves_no_process_and_no_socket(tiny_qwen2: Path) -> None:
    eng = EngineProcess(str(tiny_qwen2), ARGS).start()
    assert eng.proc is not None
    kids = children_of(eng.proc.pid)
    assert len(kids) >= 6  # executor, scheduler, gateway, tokenizer, detokenizer, http
    assert chat(eng).status_code == 200
    socks = [f for f in os.listdir(eng.run_dir) if f.endswith(".sock")]
    assert socks
    assert eng.stop() == 0
    time.sleep(0.5)
    alive = [
        p
        for p in kids
        if Path(f"/proc/{p}").exists() and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
    ]
    assert alive == []
    assert [f for f in os.listdir(eng.run_dir) if f.endswith(".sock")] == []


def test_killed_tokenizer_is_restarted_and_junk_is_ignored(tiny_qwen2: Path) -> None:
    eng = EngineProcess(str(tiny_qwen2), ARGS).start()
    try:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.connect(eng.front)
        sock.send_multipart([b"not json at all", b"\x00\x01"])
        sock.send_multipart([b'{"kind": "generate", "body": {"request_id": 5}}'])
        sock.close(linger=100)
        ctx.term()
        assert chat(eng).status_code == 200

        old = actor_pids(eng)["tokenizer0"]
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = actor_pids(eng).get("tokenizer0")
            if new and new != old and chat(eng).status_code == 200:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"tokenizer not restarted:\n{eng.log()}")
    finally:
        eng.stop()


def test_max_model_len_beyond_the_kv_pool_is_refused_at_start(tiny_qwen2: Path) -> None:
    eng = EngineProcess(
        str(tiny_qwen2),
        ["--max-model-len", "512", "--kv-cache-memory", str(4 * 8192), "--threads", "1"],
        http=False,
    )
    try:
        eng.start(timeout=60)
    except RuntimeError as exc:
        assert "does not fit in the KV cache" in str(exc)
    else:
        eng.stop()
        raise AssertionError("the engine started with a KV pool too small for max_model_len")
    assert eng.proc is not None and eng.proc.returncode == 1
