"""ASGI pieces shared by the HTTP stage's middlewares (gate.py, drain.py, readiness.py): the
route of a request, an OpenAI error as a whole response, and a request counted until its last
body message is sent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from protocols.messages import ErrorInfo
from protocols.openai.convert import error_body


def route_path(scope: Any) -> str:
    """The request's path without the proxy's root path."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return str(path).rstrip("/") or "/"


async def send_error(send: Any, info: ErrorInfo, retry_after: int | None = None) -> None:
    """An OpenAI error body as the whole response."""
    body = orjson.dumps(error_body(info))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if info.code == 408:  # a client this slow does not keep its connection
        headers.append((b"connection", b"close"))
    # (after a 413 uvicorn reads the rest of the body and drops it, for at most its keep-alive
    # timeout, so the client reads the answer instead of a reset connection)
    await send({"type": "http.response.start", "status": info.code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def forward_counted(
    app: Any, scope: Any, receive: Any, send: Any, done: Callable[[], None]
) -> None:
    """Runs `app` on the request and calls `done` once: after its last body message is sent, or
    when it ends without one (an error, a dropped client)."""
    pending = True

    async def counting_send(message: Any) -> None:
        nonlocal pending
        await send(message)
        if pending and message["type"] == "http.response.body" and not message.get("more_body"):
            pending = False
            done()

    try:
        await app(scope, receive, counting_send)
    finally:
        if pending:
            done()
