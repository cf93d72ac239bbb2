"""The front door: a ROUTER that any number of SDK clients (and the HTTP adapter) connect to.

Requests go on to the tokenizer replicas; outputs and errors come back here and are routed to the
client that asked, by request id. Aborts go straight to the scheduler.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from core.actor import Actor
from core.codec import CodecError
from core.control import ActorReady
from protocols.messages import (
    AbortRequest,
    ErrorInfo,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    OutputBatch,
    RequestError,
    RequestOutput,
)


class GatewayActor(Actor):
    async def setup(self) -> dict[str, Any]:
        a = self.addresses
        self.front = self.transport.front_door(a.front)
        self.inbox = self.transport.mailbox(a.gateway)
        self.to_tokenizers = self.transport.outbox(a.tokenizer, bind=True)
        self.to_scheduler = self.transport.outbox(a.scheduler)
        self.clients: dict[str, bytes] = {}  # request id -> client identity
        self.ready = False
        self.info: dict[str, Any] = dict(self.engine_info)
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
                    ActorReady: self.on_engine_ready,
                },
            )

    async def _serve_clients(self) -> None:
        while True:
            try:
                ident, record = await self.front.recv()
            except CodecError as exc:
                self.log.warning("bad client message", error=str(exc))
                continue
            if isinstance(record, GenerateRequest):
                await self._admit(ident, record)
            elif isinstance(record, AbortRequest):
                if self.clients.pop(record.request_id, None) is not None:
                    await self.to_scheduler.send(record)
            elif isinstance(record, HealthRequest):
                reply = HealthReply(record.request_id, ready=self.ready, info=self.info)
                await self._reply(ident, reply)

    async def _admit(self, ident: bytes, req: GenerateRequest) -> None:
        if req.request_id in self.clients:
            err = ErrorInfo(
                f"request id {req.request_id!r} is already in flight", param="request_id"
            )
            await self._reply(ident, _error_batch(req.request_id, err))
            return
        if not self.ready:
            err = ErrorInfo(
                "the engine is still starting", type="ServiceUnavailableError", code=503
            )
            await self._reply(ident, _error_batch(req.request_id, err))
            return
        self.clients[req.request_id] = ident
        req.arrival_time = req.arrival_time or time.time()
        self.log.debug("request admitted", request_id=req.request_id)
        await self.to_tokenizers.send(req)

    async def _reply(self, ident: bytes, record: Any) -> None:
        await self.front.send(ident, record)

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
            await self._reply(ident, OutputBatch(outs))

    async def on_error(self, err: RequestError) -> None:
        ident = self.clients.pop(err.request_id, None)
        self.log.info("request refused", request_id=err.request_id, error=err.error.message)
        if ident is not None:
            await self._reply(ident, _error_batch(err.request_id, err.error))

    async def on_engine_ready(self, msg: ActorReady) -> None:
        self.ready = True
        self.info.update(msg.info)


def _error_batch(request_id: str, error: ErrorInfo) -> OutputBatch:
    return OutputBatch([RequestOutput(request_id, finish_reason="error", error=error)])
