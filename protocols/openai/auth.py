"""The HTTP stage's API-key check (`--api-key`): an ASGI middleware in front of every route.

With a key set, every HTTP path but the health probes needs `Authorization: Bearer KEY` (the
API, /tokenize, /metrics, /docs, /openapi.json, unknown paths alike); others are answered 401 in
OpenAI's error shape before the request reaches a route.
"""

from __future__ import annotations

import secrets
from typing import Any

from protocols.messages import ErrorInfo
from protocols.openai.asgi import route_path, send_error

UNGUARDED_PATHS = ("/health", "/ping")  # what answers without the API key (probes)


class ApiKeyGuard:
    def __init__(self, app: Any, api_key: str, public: tuple[str, ...] = UNGUARDED_PATHS) -> None:
        self.app = app
        self.key = api_key.encode()
        self.public = public

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or route_path(scope) in self.public or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        info = ErrorInfo(
            "Unauthorized: a valid `Authorization: Bearer` key is required",
            "AuthenticationError",
            None,
            401,
        )
        await send_error(send, info)

    def _authorized(self, scope: Any) -> bool:
        given = b""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.key)
