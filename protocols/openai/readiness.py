"""Start-up at the HTTP door: the HTTP stage binds its port before the model loads, and until the
engine reports ready it answers the probes and the API 503 with Retry-After (a load balancer's
cue to wait), while /metrics, /version and the API docs answer at once.

`StartupGate` is the ASGI middleware (wrapped around the app by protocols/openai/server.py, inside
the drain guard); `watch` polls the gateway's health until the engine is ready, then the gate
opens for good.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

from protocols.messages import ErrorInfo, HealthReply
from protocols.openai.asgi import route_path, send_error

STARTING_RETRY_AFTER_S = 5
POLL_INTERVAL_S = 0.25
UNGATED_PATHS = (
    "/metrics",
    "/version",
    "/docs",
    "/redoc",
    "/openapi.json",
    "/docs/oauth2-redirect",
)


class HealthSource(Protocol):
    async def health(self, timeout: float = 5.0) -> HealthReply: ...


def starting() -> ErrorInfo:
    return ErrorInfo(
        "the engine is starting (loading the model); retry shortly",
        "ServiceUnavailableError",
        None,
        503,
    )


class StartupGate:
    """Answers 503 with Retry-After on /health, /ping and the API until `ready` is set."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.ready = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.ready or scope["type"] != "http" or route_path(scope) in UNGATED_PATHS:
            await self.app(scope, receive, send)
            return
        await send_error(send, starting(), STARTING_RETRY_AFTER_S)

    async def watch(self, engine: HealthSource, interval_s: float = POLL_INTERVAL_S) -> None:
        """Ask the engine until it says it is ready, then open the gate."""
        while not self.ready:
            try:
                reply = await engine.health(timeout=1.0)
                self.ready = reply.ready
            except Exception:  # not listening yet, or slow to answer: ask again
                pass
            if not self.ready:
                await asyncio.sleep(interval_s)
