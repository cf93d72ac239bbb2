"""The front door: a ROUTER that any number of SDK clients (and the HTTP adapter) connect to.

A request and its abort go to the tokenizer replica that owns the request (so the abort can never
overtake it); outputs and errors come back here and are routed to the client that asked.
Tokenize and detokenize requests take the same way there and back.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from actors.admission import RequestInvalid, check_request_id
from core.codec import CodecError
from core.control import ActorReady
from core.launch.addresses import owner
from core.transport import Outbox
from protocols.messages import (
    AbortRequest,
    DetokenizeRequest,
    EngineFacts,
    ErrorInfo,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    OutputBatch,
    RequestError,
    RequestOutput,
    TokenizeReply,
    TokenizeRequest,
)
from protocols.stage import Stage


class GatewayActor(Stage):
    async def setup(self) -> dict[str, Any]:
        a = self.addresses
        self.front = self.transport.front_door(a.front)
        self.inbox = self.transport.mailbox(a.gateway)
        self.to_tokenizers = [self.transport.outbox(address) for address in a.tokenizers]
        self.clients: dict[str, bytes] = {}  # request id -> client identity
        self.ready_facts: EngineFacts | None = None  # set once every stage is up
        return {}

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve_clients)
            tg.start_soon(
                self.serve,
                self.inbox,
                {
                    OutputBatch: self.on_outputs,
                    RequestError: self.on_error,
                    TokenizeReply: self.on_tokenize_reply,
                    ActorReady: self.on_engine_ready,
                },
            )

    def _tokenizer(self, request_id: str) -> Outbox:
        return self.to_tokenizers[owner(request_id, len(self.to_tokenizers))]

    async def _serve_clients(self) -> None:
        while True:
            try:
                ident, record = await self.front.recv()
            except CodecError as exc:
                self.log.warning("bad client message", error=str(exc))
                continue
            try:
                await self._on_client(ident, record)
            except Exception:  # one bad message must never close the front door
                self.log.exception("client message failed", kind=type(record).__name__)

    async def _on_client(self, ident: bytes, record: Any) -> None:
        if isinstance(record, GenerateRequest):
            await self._admit(ident, record)
        elif isinstance(record, AbortRequest):
            if self.clients.pop(record.request_id, None) is not None:
                await self._tokenizer(record.request_id).send(record)
        elif isinstance(record, (TokenizeRequest, DetokenizeRequest)):
            await self._tokenize(ident, record)
        elif isinstance(record, HealthRequest):
            ready = self.ready_facts is not None
            reply = HealthReply(record.request_id, ready=ready, facts=self.ready_facts)
            await self.front.send(ident, reply)

    async def _admit(self, ident: bytes, req: GenerateRequest) -> None:
        error = self._refusal(req.request_id)
        if error is not None:
            await self.front.send(ident, _error_batch(req.request_id, error))
            return
        self.clients[req.request_id] = ident
        req.arrival_time = req.arrival_time or time.time()
        self.log.debug("request admitted", request_id=req.request_id)
        await self._tokenizer(req.request_id).send(req)

    async def _tokenize(self, ident: bytes, req: TokenizeRequest | DetokenizeRequest) -> None:
        error = self._refusal(req.request_id)
        if error is not None:
            await self.front.send(ident, TokenizeReply(req.request_id, error=error))
            return
        self.clients[req.request_id] = ident
        await self._tokenizer(req.request_id).send(req)

    def _refusal(self, request_id: str) -> ErrorInfo | None:
        """Why a request with this id cannot enter now (bad or duplicate id, engine starting)."""
        try:
            check_request_id(request_id)
        except RequestInvalid as exc:
            return exc.error
        if request_id in self.clients:
            return ErrorInfo(f"request id {request_id!r} is already in flight", param="request_id")
        if self.ready_facts is None:
            return ErrorInfo(
                "the engine is still starting", type="ServiceUnavailableError", code=503
            )
        return None

    async def on_tokenize_reply(self, reply: TokenizeReply) -> None:
        ident = self.clients.pop(reply.request_id, None)
        if ident is not None:
            await self.front.send(ident, reply)

    async def on_outputs(self, batch: OutputBatch) -> None:
        by_client: dict[bytes, list[RequestOutput]] = {}
        for out in batch.outputs:
            ident = self.clients.get(out.request_id)
            if ident is None:
                continue  # aborted by its client
            by_client.setdefault(ident, []).append(out)
            if out.finish_reason is not None:
                del self.clients[out.request_id]
                self.log.debug(
                    "request finished", request_id=out.request_id, finish_reason=out.finish_reason
                )
        for ident, outs in by_client.items():
            await self.front.send(ident, OutputBatch(outs))

    async def on_error(self, err: RequestError) -> None:
        ident = self.clients.pop(err.request_id, None)
        self.log.info("request refused", request_id=err.request_id, error=err.error.message)
        if ident is not None:
            await self.front.send(ident, _error_batch(err.request_id, err.error))

    async def on_engine_ready(self, msg: ActorReady) -> None:
        """The supervisor's notice that every stage is up; its info holds the engine facts."""
        self.ready_facts = EngineFacts.from_info(msg.info)


def _error_batch(request_id: str, error: ErrorInfo) -> OutputBatch:
    return OutputBatch([RequestOutput(request_id, finish_reason="error", error=error)])
