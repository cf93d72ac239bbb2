"""Start-up at the HTTP door, with a real engine: the HTTP stage binds its port before the model
loads and answers /health and the API 503 with Retry-After until the engine is ready, then 200
(protocols/openai/readiness.py, core/launch/topology.py's start order)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from tests.e2e.conftest import SERVER_ARGS
from tests.e2e.engine_process import EngineProcess


def test_health_is_503_with_retry_after_while_the_engine_starts(tiny_qwen2: Path) -> None:
    eng = EngineProcess(str(tiny_qwen2), SERVER_ARGS)
    starting = threading.Thread(target=eng.start)
    seen: list[httpx.Response] = []
    try:
        starting.start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not (seen and seen[-1].status_code == 200):
            try:
                if eng.port:
                    seen.append(httpx.get(f"http://127.0.0.1:{eng.port}/health", timeout=5))
                    if seen[-1].status_code == 503:
                        chat = httpx.post(
                            f"http://127.0.0.1:{eng.port}/v1/completions",
                            json={"prompt": "hi", "max_tokens": 1},
                            timeout=5,
                        )
                        assert chat.status_code in (200, 503)  # ready in between: 200
            except httpx.TransportError:
                pass  # not listening yet
            time.sleep(0.05)
        starting.join()
        early = [r for r in seen if r.status_code == 503]
        assert early, "the port opened only when the engine was ready"
        assert early[0].headers["retry-after"] == "5"
        error = early[0].json()["error"]
        assert (error["type"], error["code"]) == ("ServiceUnavailableError", 503)
        assert "starting" in error["message"]
        assert seen[-1].status_code == 200
    finally:
        starting.join()
        eng.stop()
