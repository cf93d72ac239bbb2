"""The front door: a ROUTER that any number of SDK clients (and the HTTP adapter) connect to.

A request and its abort go to the tokenizer replica that owns the request (so the abort can never
overtake it); outputs and errors come back here and are routed to the client that asked.
Tokenize and detokenize requests take the same way there and back.

Every request ends: the table (actors/request_table.py) knows which stage holds each one, so when
the supervisor reports a stage lost (ActorLost) or the engine down (EngineDown), or a deadline
passes, the requests concerned end here with a 503 (504 past --request-timeout) and are aborted.
So do the requests of a client that stopped pinging (the HTTP stage or an SDK program died).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio

from actors.admission import RequestInvalid, check_request_id
from actors.request_table import (
    GENERATE,
    TOKENIZE,
    Deadlines,
    Failed,
    Replicas,
    RequestTable,
    may_have_images,
)
from core.codec import CodecError
from core.control import ActorLost, ActorReady, EngineDown
from core.launch.addresses import owner
from core.launch.topology import stage_of
from core.transport import Outbox
from protocols.messages import (
    PING,
    AbortRequest,
    DetokenizeRequest,
    EngineFacts,
    ErrorInfo,
    GenerateRequest,
    HealthReply,
    HealthRequest,
    OutputBatch,
    RequestError,
    RequestMoved,
    RequestOutput,
    TokenizeReply,
    TokenizeRequest,
)
from protocols.stage import Stage

EXPIRE_EVERY_S = 0.5  # how often the deadlines are looked at


class GatewayActor(Stage):
    async def setup(self) -> dict[str, Any]:
        a, c = self.addresses, self.config
        self.front = self.transport.front_door(a.front)
        self.inbox = self.transport.mailbox(a.gateway)
        self.to_tokenizers = [self.transport.outbox(address) for address in a.tokenizers]
        replicas = Replicas(len(a.tokenizers), len(a.images), len(a.detokenizers))
        self.table = RequestTable(
            replicas, Deadlines(request_s=c.request_timeout_s, client_s=c.heartbeat_timeout_s)
        )
        self.ready_facts: EngineFacts | None = None  # set once every stage is up
        self.down: str | None = None  # why the engine is down (EngineDown), until replaced
        self.instance = uuid.uuid4().hex  # told in every HealthReply (see protocols/client.py)
        return {}

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve_clients)
            tg.start_soon(self._expire_loop)
            tg.start_soon(
                self.serve,
                self.inbox,
                {
                    OutputBatch: self.on_outputs,
                    RequestError: self.on_error,
                    TokenizeReply: self.on_tokenize_reply,
                    ActorReady: self.on_engine_ready,
                    RequestMoved: self.on_moved,
                    ActorLost: self.on_actor_lost,
                    EngineDown: self.on_engine_down,
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
            ping = isinstance(record, HealthRequest) and record.request_id.startswith(PING)
            self.table.heard(ident, time.monotonic(), ping)
            try:
                await self._on_client(ident, record)
            except Exception:  # one bad message must never close the front door
                self.log.exception("client message failed", kind=type(record).__name__)

    async def _on_client(self, ident: bytes, record: Any) -> None:
        if isinstance(record, GenerateRequest):
            await self._admit(ident, record)
        elif isinstance(record, AbortRequest):
            if self.table.finish(record.request_id) is not None:
                await self._tokenizer(record.request_id).send(record)
        elif isinstance(record, (TokenizeRequest, DetokenizeRequest)):
            await self._tokenize(ident, record)
        elif isinstance(record, HealthRequest):
            ready = self.ready_facts is not None
            reply = HealthReply(record.request_id, ready, self.ready_facts, self.instance)
            await self.front.send(ident, reply)

    async def _admit(self, ident: bytes, req: GenerateRequest) -> None:
        error = self._refusal(req.request_id)
        if error is not None:
            await self.front.send(ident, _error_batch(req.request_id, error))
            return
        images = may_have_images(req.messages)
        self.table.admit(req.request_id, ident, GENERATE, time.monotonic(), images)
        req.arrival_time = req.arrival_time or time.time()
        self.log.debug("request admitted", request_id=req.request_id)
        await self._tokenizer(req.request_id).send(req)

    async def _tokenize(self, ident: bytes, req: TokenizeRequest | DetokenizeRequest) -> None:
        error = self._refusal(req.request_id)
        if error is not None:
            await self.front.send(ident, TokenizeReply(req.request_id, error=error))
            return
        self.table.admit(req.request_id, ident, TOKENIZE, time.monotonic())
        await self._tokenizer(req.request_id).send(req)

    def _refusal(self, request_id: str) -> ErrorInfo | None:
        """Why a request with this id cannot enter now (bad or duplicate id, engine starting)."""
        try:
            check_request_id(request_id)
        except RequestInvalid as exc:
            return exc.error
        if request_id in self.table:
            return ErrorInfo(f"request id {request_id!r} is already in flight", param="request_id")
        if self.down is not None:
            return ErrorInfo(
                f"the engine is down ({self.down}); retry shortly",
                type="ServiceUnavailableError",
                code=503,
            )
        if self.ready_facts is None:
            return ErrorInfo(
                "the engine is still starting", type="ServiceUnavailableError", code=503
            )
        return None

    async def on_tokenize_reply(self, reply: TokenizeReply) -> None:
        entry = self.table.finish(reply.request_id)
        if entry is not None:
            await self.front.send(entry.client, reply)

    async def on_outputs(self, batch: OutputBatch) -> None:
        by_client: dict[bytes, list[RequestOutput]] = {}
        for out in batch.outputs:
            ident = self.table.client(out.request_id)
            if ident is None:
                continue  # aborted by its client, or already failed here
            by_client.setdefault(ident, []).append(out)
            if out.finish_reason is not None:
                self.table.finish(out.request_id)
                self.log.debug(
                    "request finished", request_id=out.request_id, finish_reason=out.finish_reason
                )
        for ident, outs in by_client.items():
            await self.front.send(ident, OutputBatch(outs))

    async def on_error(self, err: RequestError) -> None:
        entry = self.table.finish(err.request_id)
        self.log.info("request refused", request_id=err.request_id, error=err.error.message)
        if entry is not None:
            await self.front.send(entry.client, _error_batch(err.request_id, err.error))

    async def on_engine_ready(self, msg: ActorReady) -> None:
        """The supervisor's notice that every stage is up; its info holds the engine facts."""
        self.ready_facts = EngineFacts.from_info(msg.info)

    async def on_moved(self, msg: RequestMoved) -> None:
        self.table.moved(msg.request_id, msg.hop, time.monotonic())

    async def on_actor_lost(self, msg: ActorLost) -> None:
        """A stateless replica died or froze and is being restarted: the requests it held end."""
        stage = stage_of(msg.actor)
        if stage is None:
            return
        failed = self.table.lost(*stage)
        self.log.warning("stage lost", actor=msg.actor, why=msg.why, requests=len(failed))
        await self._fail(failed)

    async def on_engine_down(self, msg: EngineDown) -> None:
        """An engine stage is gone: every request ends, and new ones are refused until this
        gateway is replaced by the restarted engine's."""
        self.down = msg.why
        self.ready_facts = None
        failed = self.table.engine_down(msg.why, msg.restarting)
        self.log.warning("engine down", why=msg.why, requests=len(failed))
        await self._fail(failed)

    async def _expire_loop(self) -> None:
        while True:
            await anyio.sleep(EXPIRE_EVERY_S)
            now = time.monotonic()
            failed = self.table.expired(now)
            if failed:
                self.log.warning("requests past their deadline", requests=len(failed))
                await self._fail(failed)
            orphans = self.table.silent(now)
            if orphans:
                self.log.warning("client gone: its requests are aborted", requests=len(orphans))
                await self._fail(orphans)

    async def _fail(self, failed: list[Failed]) -> None:
        """End each request at its client with its error, and abort it along its path (the
        abort follows the request through the same sockets, so it cannot overtake it)."""
        for f in failed:
            rid = f.request_id
            if f.entry.kind == TOKENIZE:
                await self.front.send(f.entry.client, TokenizeReply(rid, error=f.error))
            else:
                await self.front.send(f.entry.client, _error_batch(rid, f.error))
            if f.abort:
                await self._tokenizer(rid).send(AbortRequest(rid))


def _error_batch(request_id: str, error: ErrorInfo) -> OutputBatch:
    return OutputBatch([RequestOutput(request_id, finish_reason="error", error=error)])
