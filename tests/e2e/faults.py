"""Helpers of the fault suite (tests/e2e/test_faults.py): 16 concurrent streamed chat requests
against a real server, each classified by how it ended, and the probes that time a recovery."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

from tests.e2e.engine_process import EngineProcess

STREAMS = 16
USAGE = re.compile(r'"usage":\{[^}]*"completion_tokens":(\d+)')
STREAM_DEADLINE_S = 45.0  # a request not ended by then hangs (the server's own is 30 s)


def png_data_url(size: int = 56, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(i: int, max_tokens: int, image: bool, image_url: str | None = None) -> dict:
    """A streamed chat request; with `image`, a 56x56 PNG as a data URL or from `image_url`."""
    content: list[dict] = [{"type": "text", "text": f"story number {i}"}]
    if image:
        url = image_url or png_data_url(56, i)
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class Outcome:
    """How one request ended: "ok" (every token, then [DONE]), "error" (a 503 with Retry-After,
    or an SSE error event then [DONE]), "dropped" (the connection closed: the HTTP stage died),
    or "hung" (nothing ended it within STREAM_DEADLINE_S)."""

    kind: str
    detail: str = ""
    chunks: int = 0
    tokens: int = 0  # completion_tokens of the final usage chunk
    first_chunk_at: float | None = None
    seconds: float = 0.0


@dataclass
class Progress:
    flowing: int = 0  # streams that have their first token


async def one_stream(
    client: httpx.AsyncClient, url: str, body: dict, progress: Progress
) -> Outcome:
    t0 = time.monotonic()
    out = Outcome("hung")
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                code = r.json()["error"]["code"]
                ok = r.status_code == 503 and code == 503 and r.headers.get("retry-after")
                out.kind = "error" if ok else "bad"
                out.detail = f"{r.status_code} {r.text[:200]}"
                return out
            errored = False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    full = out.tokens == body["max_tokens"]
                    out.kind = "error" if errored else ("ok" if full else "bad")
                    return out
                usage = USAGE.search(line)
                if usage:
                    out.tokens = int(usage.group(1))
                if line.startswith('data: {"error"'):
                    errored, out.detail = True, line[:300]
                elif line.startswith("data: ") and '"content":"' in line:
                    if out.first_chunk_at is None:
                        out.first_chunk_at = time.monotonic()
                        progress.flowing += 1
                    out.chunks += '"content":""' not in line
            out.kind, out.detail = "bad", "the stream ended without [DONE]"
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError) as exc:
        out.kind, out.detail = "dropped", type(exc).__name__
    finally:
        out.seconds = time.monotonic() - t0
    return out


async def run_streams(
    eng: EngineProcess,
    max_tokens: int,
    images: int,
    fault: Callable[[], None],
    when: str | float,
    image_url: str | None = None,
) -> list[Outcome]:
    """STREAMS requests at once (the first `images` with an image); `fault()` is called when
    `when` is "flowing" (every stream has its first token) or after `when` seconds."""
    url = eng.base_url + "/chat/completions"
    limits = httpx.Limits(max_connections=STREAMS + 4)
    progress = Progress()
    async with httpx.AsyncClient(timeout=STREAM_DEADLINE_S, limits=limits) as client:
        tasks = [
            asyncio.ensure_future(
                asyncio.wait_for(
                    one_stream(
                        client, url, chat_body(i, max_tokens, i < images, image_url), progress
                    ),
                    STREAM_DEADLINE_S,
                )
            )
            for i in range(STREAMS)
        ]
        fired = asyncio.ensure_future(_fire(fault, when, tasks, progress))
        done = await asyncio.gather(*tasks, return_exceptions=True)
        await fired
    return [d if isinstance(d, Outcome) else Outcome("hung", repr(d)) for d in done]


async def _fire(
    fault: Callable[[], None],
    when: str | float,
    tasks: Sequence[asyncio.Future],
    progress: Progress,
) -> None:
    if isinstance(when, str):  # every stream is generating (or over)
        while progress.flowing < STREAMS and not all(t.done() for t in tasks):
            await asyncio.sleep(0.02)
    else:
        await asyncio.sleep(when)
    await asyncio.to_thread(fault)


def health(eng: EngineProcess) -> int:
    try:
        return httpx.get(eng.root_url + "/health", timeout=10).status_code
    except httpx.HTTPError:
        return 0


def wait_health(eng: EngineProcess, status: int, within_s: float) -> float:
    """Seconds until /health answers `status`; AssertionError after `within_s`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within_s:
        if health(eng) == status:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"/health did not answer {status} within {within_s} s:\n{eng.log()}")


def chat_ok(eng: EngineProcess, image: bool = False) -> bool:
    body = chat_body(99, 4, image) | {"stream": False}
    try:
        r = httpx.post(eng.base_url + "/chat/completions", json=body, timeout=30)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def wait_served(eng: EngineProcess, since: float, within_s: float, image: bool = False) -> float:
    """Seconds from `since` until a request is served again; AssertionError after `within_s`."""
    while time.monotonic() - since < within_s:
        if chat_ok(eng, image):
            return time.monotonic() - since
        time.sleep(0.1)
    raise AssertionError(f"not served again within {within_s} s:\n{eng.log()}")


class SlowImages:
    """A local HTTP server answering every path with a 56x56 PNG after `delay_s`: requests
    that fetch from it stay in the image stage that long."""

    def __init__(self, delay_s: float) -> None:
        body = base64.b64decode(png_data_url(56, 7).split(",", 1)[1])

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(delay_s)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the image stage that asked was killed
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/slow.png"

    def close(self) -> None:
        self.server.shutdown()
