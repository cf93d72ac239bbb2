"""Server-sent events for streamed chat and text completions, in OpenAI's chunk shapes.

Back path of a `stream=true` request: RequestOutput increments from the engine client -> SSE bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import anyio
import orjson

from protocols.messages import ErrorInfo, RequestOutput
from protocols.openai.convert import chat_logprobs, chunk, completion_logprobs, error_body, usage

DONE = b"data: [DONE]\n\n"


def event(body: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\n\n"


@dataclass
class ChunkRenderer:
    """What every chunk of one response shares; subclasses shape the choices."""

    response_id: str
    created: int
    model: str
    include_usage: bool
    top_k: int | None  # None: no logprobs
    object: str = ""
    completion_tokens: int = 0

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return chunk(
            self.response_id, self.object, self.created, self.model, [choice], self.include_usage
        )

    def start(self) -> list[dict[str, Any]]:
        return []

    def choice(self, out: RequestOutput) -> dict[str, Any]:
        raise NotImplementedError

    def render(self, out: RequestOutput) -> list[dict[str, Any]]:
        self.completion_tokens += len(out.token_ids)
        if not (out.text or out.logprobs or out.finish_reason or out.mm_info):
            return []
        choice = self.choice(out)
        if out.finish_reason is not None:
            choice["stop_reason"] = out.stop_reason
        body = self._chunk(choice)
        if out.mm_info:  # image sizes, on the first chunk that carries output
            body["tessera"] = out.mm_info
        return [body]

    def finish(self, out: RequestOutput) -> list[dict[str, Any]]:
        if not self.include_usage:
            return []
        return [
            chunk(
                self.response_id,
                self.object,
                self.created,
                self.model,
                [],
                True,
                usage(out, self.completion_tokens),
            )
        ]


@dataclass
class ChatChunks(ChunkRenderer):
    object: str = "chat.completion.chunk"

    def start(self) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": ""}
        return [self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None})]

    def choice(self, out: RequestOutput) -> dict[str, Any]:
        logprobs = None
        if self.top_k is not None and out.logprobs:
            logprobs = chat_logprobs(out.logprobs, self.top_k)
        delta = {"content": out.text} if out.text else {}
        return {
            "index": 0,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason,
        }


@dataclass
class CompletionChunks(ChunkRenderer):
    object: str = "text_completion"
    text_offset: int = 0

    def choice(self, out: RequestOutput) -> dict[str, Any]:
        logprobs = None
        if self.top_k is not None and out.logprobs:
            logprobs = completion_logprobs(out.logprobs, self.top_k, self.text_offset)
            self.text_offset += sum(len(p.sampled.token) for p in out.logprobs)
        return {
            "index": 0,
            "text": out.text,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason,
        }


async def close_quietly(outputs: AsyncGenerator[RequestOutput, None]) -> None:
    """Close the engine stream (which aborts the request if unfinished), even when cancelled."""
    with anyio.move_on_after(5, shield=True), contextlib.suppress(Exception):
        await outputs.aclose()


def _failure(out: RequestOutput) -> ErrorInfo | None:
    if out.error is not None:
        return out.error
    if out.finish_reason == "error":
        return ErrorInfo("the engine failed this request", "InternalServerError", None, 500)
    return None


async def sse(
    first: RequestOutput, outputs: AsyncGenerator[RequestOutput, None], renderer: ChunkRenderer
) -> AsyncGenerator[bytes, None]:
    """The event stream of one request; `first` is the increment already read to check errors."""
    try:
        for body in renderer.start():
            yield event(body)
        out = first
        while True:
            failure = _failure(out)
            if failure is not None:
                yield event(error_body(failure))
                break
            for body in renderer.render(out):
                yield event(body)
            if out.finish_reason is not None:
                for body in renderer.finish(out):
                    yield event(body)
                break
            try:
                out = await outputs.__anext__()
            except StopAsyncIteration:
                out = RequestOutput(request_id=first.request_id, finish_reason="error")
            except Exception as exc:  # the engine link failed mid-stream
                info = ErrorInfo(f"engine error: {exc}", "InternalServerError", None, 500)
                out = RequestOutput(request_id=first.request_id, finish_reason="error", error=info)
        yield DONE
    finally:
        await close_quietly(outputs)
