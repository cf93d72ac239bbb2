"""The HTTP door's admission: what is refused before a request's body is even typed.

ASGI middleware inside the FastAPI app (after CORS and the API key, before routing): header
count and size (431), the generation queue (429 with Retry-After, decided before the body is
read, so before any image is fetched or text tokenized), the body's size (413, from
Content-Length or as it arrives) and how long it takes to arrive (408). The body is read here
once and replayed to the route. Field caps (messages, prompt characters, n, stop strings) come
next, in the routes (protocols/limits.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio

from core.config import EngineConfig
from protocols.messages import ErrorInfo
from protocols.openai.asgi import forward_counted, route_path, send_error

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
QUEUE_RETRY_AFTER_S = 1


@dataclass(frozen=True)
class GateLimits:
    """The door's caps, read from the EngineConfig."""

    capacity: int  # generation requests held at once: running batch plus queue
    max_body_bytes: int
    max_headers: int
    max_header_bytes: int
    body_timeout_s: float

    @classmethod
    def of(cls, config: EngineConfig) -> GateLimits:
        return cls(
            capacity=config.max_num_seqs + config.max_num_queued_requests,
            max_body_bytes=config.max_request_body_bytes,
            max_headers=config.max_request_headers,
            max_header_bytes=config.max_request_header_bytes,
            body_timeout_s=config.request_body_timeout_s,
        )


def header_refusal(headers: list[tuple[bytes, bytes]], limits: GateLimits) -> ErrorInfo | None:
    """431 when a request has too many header lines or too many header bytes."""
    if len(headers) > limits.max_headers:
        return ErrorInfo(
            f"the request has {len(headers)} header lines; at most {limits.max_headers} are "
            "accepted",
            "RequestHeaderFieldsTooLargeError",
            None,
            431,
        )
    size = sum(len(name) + len(value) for name, value in headers)
    if size > limits.max_header_bytes:
        return ErrorInfo(
            f"the request's headers are {size} bytes; at most {limits.max_header_bytes} are "
            "accepted",
            "RequestHeaderFieldsTooLargeError",
            None,
            431,
        )
    return None


def declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The Content-Length a request declares (None when absent or not a number)."""
    for name, value in headers:
        if name.lower() == b"content-length":
            text = value.strip()
            return int(text) if text.isdigit() else None
    return None


def too_large(limit: int) -> ErrorInfo:
    return ErrorInfo(
        f"the request body is larger than {limit} bytes (--max-request-body-bytes)",
        "RequestTooLargeError",
        None,
        413,
    )


def queue_full(capacity: int) -> ErrorInfo:
    return ErrorInfo(
        f"the server is at capacity ({capacity} generation requests running or queued); "
        "retry later",
        "RateLimitError",
        None,
        429,
    )


class _BodyRefused(Exception):
    def __init__(self, info: ErrorInfo) -> None:
        self.info = info


class RequestGate:
    """ASGI middleware: refuses oversized, slow or unaffordable requests before the app runs;
    counts generation requests until their response's last byte is sent."""

    def __init__(self, app: Any, config: EngineConfig) -> None:
        self.app = app
        self.limits = GateLimits.of(config)
        self.generating = 0  # generation requests in the app now

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = list(scope.get("headers", ()))
        refusal = header_refusal(headers, self.limits)
        if refusal is not None:
            await send_error(send, refusal)
            return
        generation = scope.get("method") == "POST" and route_path(scope) in GENERATION_PATHS
        if generation and self.generating >= self.limits.capacity:
            await send_error(send, queue_full(self.limits.capacity), QUEUE_RETRY_AFTER_S)
            return
        declared = declared_length(headers)
        if declared is not None and declared > self.limits.max_body_bytes:
            await send_error(send, too_large(self.limits.max_body_bytes))
            return
        try:
            body = await self._read_body(receive)
        except _BodyRefused as refused:
            await send_error(send, refused.info)
            return
        if body is None:  # the client went away
            return
        await self._forward(scope, _replay(body, receive), send, generation)

    async def _read_body(self, receive: Any) -> bytes | None:
        """The whole body, within the size cap and the time limit (None: client disconnected)."""
        chunks: list[bytes] = []
        size = 0
        limit = self.limits.max_body_bytes
        with anyio.move_on_after(self.limits.body_timeout_s) as scope:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _BodyRefused(too_large(limit))
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        assert scope.cancelled_caught
        raise _BodyRefused(
            ErrorInfo(
                f"the request body did not arrive within {self.limits.body_timeout_s:g} s "
                "(--request-body-timeout)",
                "RequestTimeoutError",
                None,
                408,
            )
        )

    async def _forward(self, scope: Any, receive: Any, send: Any, generation: bool) -> None:
        if not generation:
            await self.app(scope, receive, send)
            return
        self.generating += 1

        def done() -> None:
            self.generating -= 1

        await forward_counted(self.app, scope, receive, send, done)


def _replay(body: bytes, receive: Any) -> Any:
    """A receive() that gives the body already read, then waits on the client (disconnects)."""
    given = False

    async def replayed() -> Any:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
