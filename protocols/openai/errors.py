"""The adapter's refusal: an exception that carries the OpenAI error body it becomes. Raised by
the request readers (convert.py, structured.py); app.py turns it into the HTTP response."""

from __future__ import annotations

from protocols.messages import ErrorInfo


class OpenAIError(Exception):
    """A request refused by the adapter; carries the OpenAI error it becomes."""

    def __init__(
        self, message: str, type: str = "BadRequestError", param: str | None = None, code: int = 400
    ) -> None:
        super().__init__(message)
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
