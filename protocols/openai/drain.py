"""Draining on shutdown: the HTTP actor stops taking requests (503 with Retry-After) while the
ones in flight finish, then closes. `DrainGuard` is the ASGI middleware that counts requests in
flight and refuses new ones once `draining` is set; protocols/openai/server.py drives it."""

from __future__ import annotations

from typing import Any

import orjson

from protocols.messages import ErrorInfo
from protocols.openai.convert import error_body

RETRY_AFTER_S = 5


class DrainGuard:
    """Counts HTTP requests until their last body message is sent; while draining, answers
    every new request 503 (the load balancer's cue to go elsewhere)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.draining = False
        self.in_flight = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            info = ErrorInfo(
                "the server is shutting down; retry on another replica or later",
                "ServiceUnavailableError",
                None,
                503,
            )
            body = orjson.dumps(error_body(info))
            headers = [
                (b"content-type", b"application/json"),
                (b"retry-after", str(RETRY_AFTER_S).encode()),
                (b"content-length", str(len(body)).encode()),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        done = False

        async def counted_send(message: Any) -> None:
            nonlocal done
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done = True
                self.in_flight -= 1

        try:
            await self.app(scope, receive, counted_send)
        finally:
            if not done:
                self.in_flight -= 1
