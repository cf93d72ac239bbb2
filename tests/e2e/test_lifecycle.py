"""Process lifecycle: SIGTERM stops every actor and removes every socket file; a dead stateless
stage is restarted; junk on the front socket never takes the engine down."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import zmq

from tests.e2e.engine_process import EngineProcess, actor_pids, children_of

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


def test_sigterm_drains_streams_in_flight_and_refuses_new_requests(tiny_qwen2: Path) -> None:
    """SIGTERM with 8 streams running: all 8 finish whole ([DONE], their max_tokens), /health
    and new requests get 503 with Retry-After meanwhile, and the engine then exits cleanly."""
    import threading

    args = [*ARGS, "--max-model-len", "256", "--shutdown-timeout", "60"]
    eng = EngineProcess(str(tiny_qwen2), args).start()
    assert eng.proc is not None
    results: list[tuple[int, bool]] = []
    started = threading.Barrier(9)

    def stream() -> None:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 100,
            "stream": True,
            "ignore_eos": True,
        }
        chunks, done = 0, False
        with httpx.stream("POST", eng.base_url + "/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            started.wait()
            for line in lines:
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"content":"' in line:
                    chunks += 1
        results.append((chunks, done))

    threads = [threading.Thread(target=stream) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait()  # every stream is open
    eng.proc.send_signal(signal.SIGTERM)
    refused = None
    for _ in range(100):  # the launcher stops the HTTP stage first, which starts draining
        try:
            r = httpx.get(eng.root_url + "/health", timeout=2)
        except httpx.HTTPError:
            break
        if r.status_code == 503:
            refused = chat(eng)
            break
        time.sleep(0.05)
    for t in threads:
        t.join(timeout=120)
    code = eng.proc.wait(timeout=120)
    assert refused is not None and refused.status_code == 503
    assert refused.headers["retry-after"] and refused.json()["error"]["code"] == 503
    assert len(results) == 8 and all(done for _, done in results), results
    assert all(chunks >= 90 for chunks, _ in results), results  # whole answers, not cut
    assert code == 0
