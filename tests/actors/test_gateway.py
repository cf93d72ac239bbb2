"""The gateway over real sockets with the real SDK client: it is ready (with the engine facts) once
the supervisor's notice arrives, routes a request and its abort to the tokenizer replica that owns
the request, and routes outputs and refusals back to the client that asked; tokenize and
detokenize requests take the same way there and back."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from actors.gateway import GatewayActor
from core.actor import ActorSpec
from core.config import EngineConfig
from core.control import ActorReady
from core.launch.addresses import make_addresses, owner
from core.transport import Mailbox, Outbox, Transport
from protocols.client import AsyncEngineClient
from protocols.messages import (
    AbortRequest,
    DetokenizeRequest,
    ErrorInfo,
    GenerateRequest,
    OutputBatch,
    RequestError,
    RequestOutput,
    TokenizeReply,
    TokenizeRequest,
)
from tests.actors.front_stages import RECV_LIMIT_S, facts

TOKENIZERS = 3
Body = Callable[[AsyncEngineClient, list[Mailbox], Outbox], Awaitable[None]]


def serve_gateway(tmp_path: Path, body: Body) -> None:
    """A real gateway on real sockets; `body` gets the SDK client, the tokenizers' mailboxes and
    a way into the gateway's own mailbox."""
    addresses, _ = make_addresses("ipc", str(tmp_path), 1, TOKENIZERS, 1, 1)
    gateway = GatewayActor(
        ActorSpec("gateway", "", ready_info=facts(images=False).to_info()),
        EngineConfig(log_level="warning"),
        addresses.to_dict(),
    )

    async def main() -> None:
        t = Transport()
        client = AsyncEngineClient(addresses.front)
        tokenizers = [t.mailbox(a) for a in addresses.tokenizers]
        to_gateway = t.outbox(addresses.gateway)
        try:
            await gateway.setup()
            async with anyio.create_task_group() as tg:
                tg.start_soon(gateway.run)
                with anyio.fail_after(RECV_LIMIT_S):
                    await body(client, tokenizers, to_gateway)
                tg.cancel_scope.cancel()
        finally:
            client.close()
            t.close()
            gateway.transport.close()

    anyio.run(main)


def test_readiness_routing_and_aborts(tmp_path: Path) -> None:
    engine = facts(images=False)

    async def body(
        client: AsyncEngineClient, tokenizers: list[Mailbox], to_gateway: Outbox
    ) -> None:
        reply = await client.health()
        assert not reply.ready and reply.facts is None
        early = [out async for out in client.generate(GenerateRequest("early", prompt="x"))]
        assert early[0].error is not None and early[0].error.code == 503

        await to_gateway.send(ActorReady("supervisor", 1, {**engine.to_info(), "url": "http://x"}))
        reply = await client.wait_ready(timeout=RECV_LIMIT_S)
        assert reply.ready and reply.facts == engine
        for bad_id in (5, ""):  # the gateway routes by request id: it must be a string
            bad = GenerateRequest(bad_id, prompt="x")  # type: ignore[arg-type]
            refused = [out async for out in client.generate(bad)]
            assert refused[0].error is not None and refused[0].error.param == "request_id"

        rids = [f"req-{i}" for i in range(8)]
        outputs: dict[str, list[RequestOutput]] = {}

        async def consume(rid: str) -> None:
            outputs[rid] = [o async for o in client.generate(GenerateRequest(rid, prompt="x"))]

        async with anyio.create_task_group() as tg:
            for rid in rids:
                tg.start_soon(consume, rid)
            for i, box in enumerate(tokenizers):  # each request reaches the replica owning it
                mine = {rid for rid in rids if owner(rid, TOKENIZERS) == i}
                assert {(await box.recv()).request_id for _ in mine} == mine
            done, failed, aborted = rids[:-2], rids[-2], rids[-1]
            await to_gateway.send(
                OutputBatch([RequestOutput(rid, "hi", [1], finish_reason="stop") for rid in done])
            )
            await to_gateway.send(RequestError(failed, ErrorInfo("no", param="prompt")))
            await client.abort(aborted)
            abort = await tokenizers[owner(aborted, TOKENIZERS)].recv()
            assert isinstance(abort, AbortRequest) and abort.request_id == aborted
        assert all(outputs[rid][-1].text == "hi" for rid in done)
        assert outputs[failed][-1].error == ErrorInfo("no", param="prompt")
        assert outputs[aborted][-1].finish_reason == "abort"  # the SDK ends an aborted stream

    serve_gateway(tmp_path, body)


def test_tokenize_requests_go_to_their_tokenizer_and_back(tmp_path: Path) -> None:
    engine = facts(images=False)

    async def body(
        client: AsyncEngineClient, tokenizers: list[Mailbox], to_gateway: Outbox
    ) -> None:
        early = await client.tokenize(TokenizeRequest("early", prompt="x"))
        assert early.error is not None and early.error.code == 503
        await to_gateway.send(ActorReady("supervisor", 1, engine.to_info()))
        await client.wait_ready(timeout=RECV_LIMIT_S)

        async def tokenizer_answers(rid: str, reply: TokenizeReply) -> None:
            got = await tokenizers[owner(rid, TOKENIZERS)].recv()
            assert got.request_id == rid
            await to_gateway.send(reply)

        cases: list[tuple[TokenizeRequest | DetokenizeRequest, TokenizeReply]] = [
            (TokenizeRequest("t1", prompt="Hi"), TokenizeReply("t1", [1, 2], max_model_len=512)),
            (DetokenizeRequest("d1", [1, 2]), TokenizeReply("d1", text="Hi")),
        ]
        for request, reply in cases:
            async with anyio.create_task_group() as tg:
                tg.start_soon(tokenizer_answers, request.request_id, reply)
                assert await client.tokenize(request) == reply

    serve_gateway(tmp_path, body)
