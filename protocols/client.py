"""The ZeroMQ client SDK: submit requests to a Tessera engine and stream their outputs back.

`AsyncEngineClient` is what the HTTP adapter and async programs use; `EngineClient` wraps it for
plain synchronous code. Both speak the one wire protocol in protocols/messages.py.

A client pings the gateway twice a second (protocols/link_watch.py): when the gateway stops
answering (it died, froze, or the engine is restarting), every request in flight ends with a 503
error and new ones are refused at once, until the gateway answers again. When the answer comes
from a new gateway (the engine restarted faster than the link timeout), the requests sent to the
old one are gone with it: they end with the same 503.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import Future
from typing import Any

import zmq
import zmq.asyncio

from core.codec import CodecError, decode, encode
from protocols.link_watch import LinkWatch
from protocols.messages import (
    PING,
    AbortRequest,
    DetokenizeRequest,
    ErrorInfo,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    OutputBatch,
    RequestOutput,
    SamplingParams,
    TokenizeReply,
    TokenizeRequest,
)


class EngineError(RuntimeError):
    """A request the engine refused or failed; carries the OpenAI-shaped error."""

    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def unreachable() -> ErrorInfo:
    """The error of a request the client ended because the gateway stopped answering."""
    return ErrorInfo(
        "the engine does not answer (it stopped or is restarting); retry shortly",
        "ServiceUnavailableError",
        None,
        503,
    )


class AsyncEngineClient:
    """One DEALER socket to the gateway; replies are demultiplexed by request id."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.queues: dict[str, asyncio.Queue[Any]] = {}  # request id -> its outputs or reply
        self.kinds: dict[str, type] = {}  # request id -> the record type its queue waits for
        self.link = LinkWatch()
        self._failed_here: set[str] = set()  # ended by a lost link: abort them once sent
        self._reader: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._send_lock = asyncio.Lock()

    def _ensure_reader(self) -> None:
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._reader = loop.create_task(self._read())
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch())

    @property
    def link_down(self) -> bool:
        """True while the gateway does not answer (see protocols/link_watch.py)."""
        return self.link.down

    async def _watch(self) -> None:
        """Ping the gateway; end every request in flight when it stops answering."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.link.interval_s / 2)
            now = loop.time()
            if self.link.ping_due(now):
                try:
                    ping = encode(HealthRequest(PING + uuid.uuid4().hex))
                    self.sock.send_multipart(ping, flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
                self.link.pinged(now)
            if await self.sock.poll(0):
                continue  # an answer is waiting: this loop was only slow to read it
            if self.link.lapsed(now):
                self._fail_all()

    def _fail_all(self) -> None:
        error = unreachable()
        for rid, q in list(self.queues.items()):
            kind = self.kinds.get(rid)
            if kind is RequestOutput:
                self._failed_here.add(rid)
                q.put_nowait(RequestOutput(rid, finish_reason="error", error=error))
            elif kind is TokenizeReply:
                q.put_nowait(TokenizeReply(rid, error=error))
            elif kind is HealthReply:
                q.put_nowait(HealthReply(rid, ready=False))

    def _open(self, rid: str, kind: type) -> asyncio.Queue[Any]:
        q: asyncio.Queue[Any] = asyncio.Queue()
        self.queues[rid] = q
        self.kinds[rid] = kind
        return q

    def _close(self, rid: str) -> None:
        self.queues.pop(rid, None)
        self.kinds.pop(rid, None)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frames = await self.sock.recv_multipart(copy=False)
            self.link.heard(loop.time())
            try:
                record = decode(frames)
            except CodecError:
                continue
            if isinstance(record, OutputBatch):
                for out in record.outputs:
                    q = self.queues.get(out.request_id)
                    if q is not None:
                        q.put_nowait(out)
            elif isinstance(record, (HealthReply, TokenizeReply)):
                if isinstance(record, HealthReply) and record.gateway:
                    if self.link.answered_by(record.gateway):
                        self._fail_all()  # a restarted gateway: the old one held them
                q = self.queues.get(record.request_id)
                if q is not None:
                    q.put_nowait(record)

    async def _send(self, record: Any) -> None:
        async with self._send_lock:
            await self.sock.send_multipart(encode(record), copy=False)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[RequestOutput, None]:
        """Yield output increments; the last one has `finish_reason`. Closing early aborts."""
        self._ensure_reader()
        rid = request.request_id
        if self.link.down:
            yield RequestOutput(rid, finish_reason="error", error=unreachable())
            return
        q = self._open(rid, RequestOutput)
        finished = False
        try:
            await self._send(request)
            while True:
                out: RequestOutput = await q.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self._close(rid)
            if not finished or rid in self._failed_here:
                self._failed_here.discard(rid)
                await asyncio.shield(self._send(AbortRequest(rid)))

    async def abort(self, request_id: str) -> None:
        """Abort a request from outside its stream; the stream ends with finish_reason "abort"."""
        q = self.queues.pop(request_id, None)
        await self._send(AbortRequest(request_id))
        if q is not None:
            q.put_nowait(RequestOutput(request_id, finish_reason="abort"))

    async def health(self, timeout: float = 5.0) -> HealthReply:
        self._ensure_reader()
        rid = "health-" + uuid.uuid4().hex
        if self.link.down:
            return HealthReply(rid, ready=False)
        q = self._open(rid, HealthReply)
        try:
            await self._send(HealthRequest(rid))
            return await asyncio.wait_for(q.get(), timeout)
        finally:
            self._close(rid)

    async def tokenize(
        self, request: TokenizeRequest | DetokenizeRequest, timeout: float = 60.0
    ) -> TokenizeReply:
        """Token ids of a prompt or chat messages (TokenizeRequest), or the text of token ids
        (DetokenizeRequest), from the engine's own tokenizer; a refusal is in `reply.error`."""
        self._ensure_reader()
        rid = request.request_id
        if self.link.down:
            return TokenizeReply(rid, error=unreachable())
        q = self._open(rid, TokenizeReply)
        try:
            await self._send(request)
            return await asyncio.wait_for(q.get(), timeout)
        finally:
            self._close(rid)

    async def wait_ready(self, timeout: float = 300.0) -> HealthReply:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                reply = await self.health(timeout=1.0)
                if reply.ready:
                    return reply
            except TimeoutError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"engine at {self.address} not ready after {timeout}s")
            await asyncio.sleep(0.1)

    async def complete(self, request: GenerateRequest) -> RequestOutput:
        """Run a request to the end and return one merged output (raises EngineError)."""
        merged = RequestOutput(request.request_id)
        async for out in self.generate(request):
            if out.error is not None:
                raise EngineError(out.error)
            merged.text += out.text
            merged.token_ids += out.token_ids
            if out.logprobs is not None:
                merged.logprobs = (merged.logprobs or []) + out.logprobs
            merged.finish_reason, merged.stop_reason = out.finish_reason, out.stop_reason
            merged.prompt_tokens, merged.completion_tokens = (
                out.prompt_tokens,
                out.completion_tokens,
            )
            merged.cached_tokens = out.cached_tokens
            merged.mm_info = merged.mm_info or out.mm_info
            if out.prompt_logprobs is not None:
                merged.prompt_logprobs = out.prompt_logprobs
                merged.prompt_token_ids = out.prompt_token_ids
                merged.prompt_token_strs = out.prompt_token_strs
        return merged

    def close(self) -> None:
        for task in (self._reader, self._watcher):
            if task is not None:
                task.cancel()
        self.sock.close(linger=0)
        self.ctx.term()


class EngineClient:
    """Synchronous SDK: the async client runs on a private event loop in a background thread."""

    def __init__(self, address: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client: AsyncEngineClient = self._call(self._make(address))

    async def _make(self, address: str) -> AsyncEngineClient:
        return AsyncEngineClient(address)

    def _call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    def wait_ready(self, timeout: float = 300.0) -> HealthReply:
        return self._call(self._client.wait_ready(timeout))

    def health(self, timeout: float = 5.0) -> HealthReply:
        return self._call(self._client.health(timeout))

    def complete(self, request: GenerateRequest) -> RequestOutput:
        return self._call(self._client.complete(request))

    def tokenize(
        self, request: TokenizeRequest | DetokenizeRequest, timeout: float = 60.0
    ) -> TokenizeReply:
        return self._call(self._client.tokenize(request, timeout))

    def complete_many(self, requests: list[GenerateRequest]) -> list[RequestOutput | EngineError]:
        """Submit all at once (they batch together in the engine); results in order."""

        async def run() -> list[RequestOutput | BaseException]:
            return await asyncio.gather(
                *(self._client.complete(r) for r in requests), return_exceptions=True
            )

        return self._call(run())

    def stream(self, request: GenerateRequest) -> Iterator[RequestOutput]:
        agen = self._client.generate(request)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())

    def abort(self, request_id: str) -> None:
        self._call(self._client.abort(request_id))

    def close(self) -> None:
        async def shut() -> None:
            self._client.close()

        self._call(shut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def new_request(
    prompt: str | None = None,
    *,
    messages: list[dict[str, Any]] | None = None,
    prompt_token_ids: list[int] | None = None,
    **sampling: Any,
) -> GenerateRequest:
    """Convenience constructor: `new_request("Hi", max_tokens=8, temperature=0)`."""
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt=prompt,
        messages=messages,
        prompt_token_ids=prompt_token_ids,
        sampling=SamplingParams(**sampling),
    )
