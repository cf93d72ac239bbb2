"""Server-sent events for streamed chat and text completions, in OpenAI's chunk shapes.

Back path of a `stream=true` request: RequestOutput increments from the engine client (one stream
per choice; a completion with a list of prompts has several) -> SSE bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson

from protocols.grounding import boxes_per_image
from protocols.messages import ErrorInfo, RequestOutput
from protocols.openai.bodies import (
    Echo,
    chat_logprobs,
    chunk,
    completion_logprobs,
    summed_usage,
    usage,
)
from protocols.openai.convert import error_body
from protocols.openai.forced_tools import ForcedCallsParser, make_reader
from protocols.openai.schemas import StreamOptions
from protocols.openai.tool_parsers import ToolCallParser

DONE = b"data: [DONE]\n\n"


def usage_options(options: StreamOptions | None) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a request: the second counts only with the
    first, as in vLLM."""
    if options is None:
        return False, False
    return options.include_usage, options.include_usage and options.continuous_usage_stats


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
    index: int = 0  # the choice this renderer's stream is
    shared: int = 1  # choices per prompt (OpenAI's n): the usage counts each prompt once
    continuous_usage: bool = False  # vLLM's continuous_usage_stats: usage so far in each chunk

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return chunk(
            self.response_id, self.object, self.created, self.model, [choice], self.include_usage
        )

    def start(self) -> list[dict[str, Any]]:
        return []

    def choice(self, out: RequestOutput) -> dict[str, Any] | None:
        """The chunk's choice; None when this increment has nothing to send yet."""
        raise NotImplementedError

    def render(self, out: RequestOutput) -> list[dict[str, Any]]:
        self.completion_tokens += len(out.token_ids)
        wanted = out.text or out.logprobs or out.finish_reason or out.mm_info
        if not (wanted or out.prompt_logprobs is not None):
            return []
        choice = self.choice(out)
        if choice is None:
            return []
        if out.finish_reason is not None:
            choice["stop_reason"] = out.stop_reason
        body = self._chunk(choice)
        if self.continuous_usage:
            body["usage"] = usage(out, self.completion_tokens)
        if out.mm_info:  # image sizes, on the first chunk that carries output
            body["tessera"] = out.mm_info
        return [body]

    def usage(self, out: RequestOutput) -> dict[str, Any]:
        """This choice's usage, `out` being its final increment."""
        return usage(out, self.completion_tokens)

    def finish(self, out: RequestOutput) -> list[dict[str, Any]]:
        return self.usage_chunk([self.usage(out)])

    def usage_chunk(self, usages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The last chunk, with no choices and the usage of every choice summed (if asked)."""
        if not self.include_usage:
            return []
        summed = summed_usage(usages, shared=self.shared)
        return [chunk(self.response_id, self.object, self.created, self.model, [], True, summed)]


@dataclass
class ChatChunks(ChunkRenderer):
    """Chat chunks; with `tool_parser` the text goes through it, calls streamed as
    `delta.tool_calls` (id and name first, then argument fragments) and the text outside them
    as `delta.content`."""

    object: str = "chat.completion.chunk"
    tool_parser: str | None = None
    parallel_tool_calls: bool = True
    boxes: bool = False  # the final chunk's `tessera.boxes` (protocols/grounding.py)
    _text: str = field(default="", init=False, repr=False)
    _images: list[dict[str, Any]] = field(default_factory=list, init=False, repr=False)
    _parser: ToolCallParser | ForcedCallsParser | None = field(default=None, init=False, repr=False)

    def start(self) -> list[dict[str, Any]]:
        if self.tool_parser is not None:
            self._parser = make_reader(self.tool_parser)
        delta = {"role": "assistant", "content": ""}
        choice = {"index": self.index, "delta": delta, "logprobs": None, "finish_reason": None}
        return [self._chunk(choice)]

    def render(self, out: RequestOutput) -> list[dict[str, Any]]:
        if not self.boxes:
            return super().render(out)
        self._text += out.text
        if out.mm_info:
            self._images = list(out.mm_info.get("images", []))
        bodies = super().render(out)
        if out.finish_reason is not None and bodies:
            tessera = bodies[-1].setdefault("tessera", {})
            tessera["boxes"] = boxes_per_image(self._text, self._images)
        return bodies

    def choice(self, out: RequestOutput) -> dict[str, Any] | None:
        logprobs = None
        if self.top_k is not None and out.logprobs:
            logprobs = chat_logprobs(out.logprobs, self.top_k)
        finish_reason = out.finish_reason
        delta: dict[str, Any] = {"content": out.text} if out.text else {}
        if self._parser is not None:
            parsed = self._parser.feed(out.text)
            if finish_reason is not None:
                parsed.extend(self._parser.finish())
                if self._parser.calls:
                    finish_reason = "tool_calls"
            calls = [c for c in parsed.tool_calls if self.parallel_tool_calls or c.index == 0]
            delta = {"content": parsed.content} if parsed.content else {}
            if calls:
                delta["tool_calls"] = [c.openai() for c in calls]
            if not (delta or logprobs or finish_reason or out.mm_info):
                return None  # text held back by the parser
        return {
            "index": self.index,
            "delta": delta,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }


@dataclass
class CompletionChunks(ChunkRenderer):
    """Text completion chunks; with `echo` the first one starts with the prompt (its text, and
    its tokens' logprobs or vLLM's `prompt_logprobs` where asked), as vLLM streams it."""

    object: str = "text_completion"
    text_offset: int = 0
    echo: Echo | None = None  # cleared once the prompt went out

    def choice(self, out: RequestOutput) -> dict[str, Any] | None:
        echo, prefix = self.echo, ""
        if echo is not None:
            self.echo = None
            prefix = echo.text or ""
            self.text_offset = len(prefix)
        logprobs = None
        if self.top_k is not None and out.logprobs:
            logprobs = completion_logprobs(out.logprobs, self.top_k, self.text_offset)
            self.text_offset += sum(len(p.sampled.token) for p in out.logprobs)
        choice = {
            "index": self.index,
            "text": prefix + out.text,
            "logprobs": logprobs,
            "finish_reason": out.finish_reason,
        }
        if echo is not None:
            echo.apply(choice, out)
        return choice


async def close_quietly(outputs: AsyncGenerator[RequestOutput, None]) -> None:
    """Close the engine stream (which aborts the request if unfinished), even when cancelled."""
    with anyio.move_on_after(5, shield=True), contextlib.suppress(Exception):
        await outputs.aclose()


def failure_of(out: RequestOutput) -> ErrorInfo | None:
    """The error an increment carries (an engine refusal or failure); None for output."""
    if out.error is not None:
        return out.error
    if out.finish_reason == "error":
        return ErrorInfo("the engine failed this request", "InternalServerError", None, 500)
    return None


async def _continued(
    first: RequestOutput, outputs: AsyncGenerator[RequestOutput, None]
) -> AsyncGenerator[RequestOutput, None]:
    """`first`, then the stream's increments, up to one that finishes it; a stream that ends
    early or fails ends with an error increment."""
    out = first
    while True:
        yield out
        if out.finish_reason is not None or out.error is not None:
            return
        try:
            out = await outputs.__anext__()
        except StopAsyncIteration:
            out = RequestOutput(request_id=first.request_id, finish_reason="error")
        except Exception as exc:  # the engine link failed mid-stream
            info = ErrorInfo(
                f"the engine link failed ({type(exc).__name__})", "InternalServerError", None, 500
            )
            out = RequestOutput(request_id=first.request_id, finish_reason="error", error=info)


async def _merged(
    firsts: list[RequestOutput], streams: list[AsyncGenerator[RequestOutput, None]]
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(choice, increment) pairs of every stream, in arrival order."""
    if len(streams) == 1:
        async with contextlib.aclosing(_continued(firsts[0], streams[0])) as one:
            async for out in one:
                yield 0, out
        return
    arrived: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

    async def pump(i: int) -> None:
        async with contextlib.aclosing(_continued(firsts[i], streams[i])) as one:
            async for out in one:
                arrived.put_nowait((i, out))

    pumps = [asyncio.ensure_future(pump(i)) for i in range(len(streams))]
    try:
        while True:
            yield await arrived.get()
    finally:
        for task in pumps:
            task.cancel()
        with anyio.move_on_after(5, shield=True):
            await asyncio.gather(*pumps, return_exceptions=True)


async def sse(
    firsts: list[RequestOutput],
    streams: list[AsyncGenerator[RequestOutput, None]],
    renderers: list[ChunkRenderer],
) -> AsyncGenerator[bytes, None]:
    """The event stream of one response: choice i is `streams[i]` (whose first increment,
    `firsts[i]`, was already read to check errors), rendered by `renderers[i]`. A failure of any
    choice ends the stream with an error event."""
    merged = _merged(firsts, streams)
    try:
        for renderer in renderers:
            for body in renderer.start():
                yield event(body)
        finals: dict[int, RequestOutput] = {}
        async for i, out in merged:
            failure = failure_of(out)
            if failure is not None:
                yield event(error_body(failure))
                break
            for body in renderers[i].render(out):
                yield event(body)
            if out.finish_reason is not None:
                finals[i] = out
                if len(finals) == len(streams):
                    usages = [r.usage(finals[k]) for k, r in enumerate(renderers)]
                    for body in renderers[0].usage_chunk(usages):
                        yield event(body)
                    break
        yield DONE
    finally:
        with anyio.move_on_after(5, shield=True):
            await merged.aclose()
        for outputs in streams:
            await close_quietly(outputs)
