"""The SDK client against a scripted gateway on a real ZMQ socket: a request in flight ends with
a 503 when the gateway that held it is replaced (a new instance answers the pings), instead of
waiting forever for outputs the old gateway took with it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from core.transport import Transport
from protocols.client import AsyncEngineClient
from protocols.messages import GenerateRequest, HealthReply, HealthRequest, RequestOutput


async def _scripted_gateway(address: str, instances: list[str], seen: list[object]) -> None:
    """Answers the first two pings as the first instance, then every later one as the next."""
    transport = Transport()
    door = transport.front_door(address)
    answered = 0
    try:
        while True:
            ident, record = await door.recv()
            seen.append(record)
            if isinstance(record, HealthRequest):
                instance = instances[1] if answered >= 2 else instances[0]
                await door.send(ident, HealthReply(record.request_id, True, None, instance))
                answered += 1
    finally:
        transport.close()


async def _generate_then_replace(address: str, instances: list[str]) -> RequestOutput:
    seen: list[object] = []
    gateway = asyncio.ensure_future(_scripted_gateway(address, instances, seen))
    client = AsyncEngineClient(address)
    try:
        outs = client.generate(GenerateRequest("r1", prompt="hi"))
        last = await asyncio.wait_for(anext(outs), 5.0)  # the gateway never answers r1 itself
        await outs.aclose()
        return last
    finally:
        client.close()
        gateway.cancel()


def test_a_replaced_gateway_ends_the_requests_sent_to_the_old_one(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/front.sock"
    out = asyncio.run(_generate_then_replace(address, ["old", "new"]))
    assert out.finish_reason == "error"
    assert out.error is not None and out.error.code == 503


def test_the_same_gateway_keeps_requests_waiting(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/front.sock"
    try:
        asyncio.run(_generate_then_replace(address, ["same", "same"]))
    except TimeoutError:
        return  # still waiting for its outputs after 5 s of answered pings: not failed
    raise AssertionError("a request failed though its gateway never changed")
