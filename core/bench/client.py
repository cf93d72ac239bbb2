"""The HTTP side: request bodies, one streamed request, and a closed-loop concurrency level.

Speaks the OpenAI streaming protocol of ``/v1/chat/completions`` and ``/v1/completions`` (SSE
``data:`` lines ending in ``data: [DONE]``), with ``stream_options.include_usage`` so the last
chunk carries ``usage``. Only httpx and orjson; nothing of Tessera's engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from core.bench.datasets import Prompt
from core.bench.metrics import RequestRecord

API_PATHS = {"chat": "/chat/completions", "completions": "/completions"}


def endpoint_url(url: str, api: str) -> str:
    """URL of the API: a full endpoint is kept as it is, a base (``.../v1``) gets the path."""
    url = url.rstrip("/")
    if url.endswith(("/chat/completions", "/completions")):
        return url
    return url + API_PATHS[api]


def models_url(endpoint: str) -> str:
    """``.../v1/models`` beside an endpoint URL."""
    for path in API_PATHS.values():
        if endpoint.endswith(path):
            return endpoint[: -len(path)] + "/models"
    return endpoint.rstrip("/") + "/models"


def headers_for(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def build_body(
    prompt: Prompt,
    api: str,
    model: str,
    max_tokens: int,
    min_tokens: int | None = None,
    temperature: float = 0.0,
    ignore_eos: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body of one streamed request (images become ``image_url`` content parts)."""
    body: dict[str, Any] = {"model": model}
    if api == "chat":
        if prompt.images:
            content: Any = [{"type": "image_url", "image_url": {"url": u}} for u in prompt.images]
            content.append({"type": "text", "text": prompt.text})
        else:
            content = prompt.text
        body["messages"] = [{"role": "user", "content": content}]
    elif prompt.images:
        raise ValueError("images need --api chat")
    else:
        body["prompt"] = prompt.text
    body.update(
        max_tokens=max_tokens,
        temperature=temperature,
        ignore_eos=ignore_eos,
        stream=True,
        stream_options={"include_usage": True},
    )
    if min_tokens is not None:
        body["min_tokens"] = min_tokens
    body.update(extra or {})
    return body


def _content_piece(choice: dict[str, Any], api: str) -> str | None:
    if api == "chat":
        delta = choice.get("delta") or {}
        return delta.get("content") or delta.get("reasoning_content")
    return choice.get("text")


def _read_usage(rec: RequestRecord, usage: dict[str, Any]) -> None:
    if usage.get("completion_tokens") is not None:
        rec.completion_tokens = int(usage["completion_tokens"])
    if usage.get("prompt_tokens") is not None:
        rec.prompt_tokens = int(usage["prompt_tokens"])
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        rec.cached_tokens = int(details["cached_tokens"])


async def send_one(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], body: bytes, api: str
) -> RequestRecord:
    """Send one streamed request; time every non-empty content delta. Never raises."""
    rec = RequestRecord(start=time.perf_counter())
    finished = False
    try:
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                text = (await resp.aread()).decode("utf-8", "replace")
                rec.error = f"HTTP {resp.status_code}: {text[:300]}"
                return rec
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                event = orjson.loads(data)
                if event.get("error"):
                    rec.error = f"stream error: {orjson.dumps(event['error']).decode()[:300]}"
                    return rec
                if event.get("usage"):
                    _read_usage(rec, event["usage"])
                for choice in event.get("choices") or []:
                    if _content_piece(choice, api):
                        rec.content_times.append(now)
                    if choice.get("finish_reason"):
                        finished = True
        if not finished:
            rec.error = "stream ended without finish_reason or [DONE]"
        else:
            rec.success = True
    except Exception as exc:  # noqa: BLE001 - any failure is a failed request, recorded
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        rec.end = time.perf_counter()
    return rec


async def run_level(
    url: str,
    headers: dict[str, str],
    bodies: list[bytes],
    api: str,
    concurrency: int,
    timeout: float,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Send BODIES with at most CONCURRENCY in flight (each worker sends its next as soon as
    its last one ends); records come back in body order."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeouts = httpx.Timeout(timeout, connect=min(timeout, 30.0))
    records: list[RequestRecord | None] = [None] * len(bodies)
    next_index = iter(range(len(bodies)))

    async with httpx.AsyncClient(timeout=timeouts, limits=limits) as client:

        async def worker() -> None:
            for i in next_index:
                rec = await send_one(client, url, headers, bodies[i], api)
                records[i] = rec
                if on_done is not None:
                    on_done(rec)

        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(bodies))))))
    return [r for r in records if r is not None]


async def first_model(endpoint: str, headers: dict[str, str], timeout: float = 30.0) -> str:
    """The first model id the server lists at ``/v1/models``."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        resp = await client.get(models_url(endpoint), headers=headers)
        resp.raise_for_status()
        data = resp.json().get("data") or []
    if not data:
        raise RuntimeError("the server lists no models")
    return str(data[0]["id"])
