"""Draining on shutdown: the HTTP actor stops taking requests (503 with Retry-After) while the
ones in flight finish, then closes. `DrainGuard` is the ASGI middleware that counts requests in
flight and refuses new ones once `draining` is set; protocols/openai/server.py drives it."""

from __future__ import annotations

from typing import Any

from protocols.messages import ErrorInfo
from protocols.openai.asgi import forward_counted, send_error

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
            await send_error(send, info, RETRY_AFTER_S)
            return
        self.in_flight += 1

        def done() -> None:
            self.in_flight -= 1

        await forward_counted(self.app, scope, receive, send, done)
