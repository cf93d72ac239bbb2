"""Admission before work, without processes: the request caps (protocols/limits.py), the HTTP
door's gate (protocols/openai/gate.py: 431, 429 with Retry-After, 413, 408), the caps applied by
the app's routes before the engine sees a request (protocols/openai/caps.py), and the start-up
gate (protocols/openai/readiness.py: 503 with Retry-After until the engine is ready)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from core.config import EngineConfig
from protocols.limits import (
    LimitExceeded,
    RequestLimits,
    check_max_tokens,
    check_messages,
    check_n,
    check_prompts,
    check_stop,
    count_images,
    text_chars,
)
from protocols.messages import HealthReply
from protocols.openai.gate import GateLimits, RequestGate, declared_length, header_refusal
from protocols.openai.readiness import StartupGate
from tests.protocols.test_openai_app import CHAT, make

LIMITS = RequestLimits(
    max_messages=3,
    max_prompt_chars=100,
    max_n=4,
    max_stop_strings=2,
    max_stop_string_chars=5,
    max_images=1,
)
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 500}}


def refused(call: Any, *args: Any) -> LimitExceeded:
    with pytest.raises(LimitExceeded) as caught:
        call(*args)
    return caught.value


# ---------------------------------------------------------------- the rules


def test_text_chars_count_every_string_but_images() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "abcd"}, IMAGE]}]
    # keys and values alike: role, user, content, then type, text, text, abcd; no image URL
    assert text_chars(messages) == 4 + 4 + 7 + 4 + 4 + 4 + 4
    assert count_images(messages) == 1 and count_images("junk") == 0


def test_messages_over_count_images_or_characters_are_refused() -> None:
    msg = {"role": "user", "content": "x"}
    check_messages([msg] * 3, None, LIMITS)
    assert "at most 3 messages" in str(refused(check_messages, [msg] * 4, None, LIMITS))
    two = [{"role": "user", "content": [IMAGE, IMAGE]}]
    assert "At most 1 image(s)" in str(refused(check_messages, two, None, LIMITS))
    long = [{"role": "user", "content": "y" * 101}]
    e = refused(check_messages, long, None, LIMITS)
    assert e.param == "messages" and "--max-prompt-chars" in str(e)
    tools = [{"type": "function", "function": {"name": "f", "description": "z" * 100}}]
    refused(check_messages, [msg], tools, LIMITS)  # tool definitions are prompt text too


def test_prompts_n_stop_and_max_tokens() -> None:
    check_prompts(["a" * 50, [1, 2, 3], "b" * 50], LIMITS)
    assert refused(check_prompts, ["a" * 60, "b" * 41], LIMITS).param == "prompt"
    assert check_n(None, LIMITS) == 1 and check_n(4, LIMITS) == 4
    assert refused(check_n, 5, LIMITS).param == "n"
    check_stop("abcde", LIMITS)
    assert "at most 2 stop strings" in str(refused(check_stop, ["a", "b", "c"], LIMITS))
    assert "--max-stop-string-chars" in str(refused(check_stop, "abcdef", LIMITS))
    check_max_tokens(256, 256, "max_tokens")
    check_max_tokens(10**9, None, "max_tokens")  # context unknown: the engine decides
    assert refused(check_max_tokens, 257, 256, "max_completion_tokens").param == (
        "max_completion_tokens"
    )


def test_limits_come_from_the_config() -> None:
    cfg = EngineConfig(max_messages=7, limit_mm_per_prompt={"image": 2})
    assert RequestLimits.of(cfg).max_messages == 7 and RequestLimits.of(cfg).max_images == 2
    assert RequestLimits.of(EngineConfig()).max_images == 64


# ---------------------------------------------------------------- the door

GATE = GateLimits(
    capacity=1, max_body_bytes=100, max_headers=3, max_header_bytes=64, body_timeout_s=0.2
)


def test_headers_over_count_or_size_are_431() -> None:
    assert header_refusal([(b"a", b"b")] * 3, GATE) is None
    many = header_refusal([(b"a", b"b")] * 4, GATE)
    assert many is not None and many.code == 431 and many.type == "RequestHeaderFieldsTooLargeError"
    big = header_refusal([(b"x-big", b"v" * 60)], GATE)
    assert big is not None and big.code == 431 and "65 bytes" in big.message
    assert declared_length([(b"Content-Length", b"42")]) == 42
    assert declared_length([(b"content-length", b"-1")]) is None


class Held:
    """An ASGI app that answers 200 once released (a generation that takes its time)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        if scope["path"] == "/v1/completions":
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def gate_config(**fields: Any) -> EngineConfig:
    return EngineConfig(max_num_seqs=1, max_num_queued_requests=0, **fields)


def test_a_full_queue_is_429_with_retry_after_before_the_body_is_read() -> None:
    async def main() -> None:
        held = Held()
        gate = RequestGate(held, gate_config())
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gate), base_url="http://t"
        ) as http:
            first = asyncio.ensure_future(http.post("/v1/completions", content=b"{}"))
            while gate.generating == 0:
                await asyncio.sleep(0.01)
            r = await http.post("/v1/completions", content=b'{"prompt": "second"}')
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            error = r.json()["error"]
            assert (error["type"], error["code"], error["param"]) == ("RateLimitError", 429, None)
            assert "at capacity (1 generation requests" in error["message"]
            assert held.bodies == [b"{}"]  # the refused body was never read
            assert (await http.get("/v1/models")).status_code == 200  # only generation queues
            held.release.set()
            assert (await first).status_code == 200
            assert gate.generating == 0
            assert (await http.post("/v1/completions", content=b"{}")).status_code == 200

    asyncio.run(main())


def test_bodies_over_the_cap_are_413_declared_or_streamed() -> None:
    async def main() -> None:
        gate = RequestGate(Held(), gate_config(max_request_body_bytes=100))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gate), base_url="http://t"
        ) as http:
            r = await http.post("/v1/chat/completions", content=b"x" * 101)
            assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLargeError"

            async def chunks() -> Any:  # no Content-Length: counted as it arrives
                for _ in range(5):
                    yield b"y" * 30

            r = await http.post("/v1/chat/completions", content=chunks())
            assert r.status_code == 413 and "100 bytes" in r.json()["error"]["message"]
            assert (await http.post("/v1/chat/completions", content=b"x" * 100)).status_code == 200

    asyncio.run(main())


def test_a_slow_body_is_408() -> None:
    async def main() -> None:
        gate = RequestGate(Held(), gate_config(request_body_timeout_s=0.1))
        sent: list[Any] = []

        async def trickle() -> Any:
            await asyncio.sleep(0.05)
            return {"type": "http.request", "body": b"{", "more_body": True}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        await gate(scope, trickle, send)
        assert sent[0]["status"] == 408
        error = orjson.loads(sent[1]["body"])["error"]
        assert (
            error["type"] == "RequestTimeoutError" and "--request-body-timeout" in error["message"]
        )
        assert gate.generating == 0

    asyncio.run(main())


# ---------------------------------------------------------------- the routes


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": "hi"}] * 4},
            "messages",
            "at most 3",
        ),
        ("/v1/chat/completions", {**CHAT, "n": 5}, "n", "--max-n"),
        ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c"]}, "stop", "stop strings"),
        ("/v1/chat/completions", {**CHAT, "max_tokens": 257}, "max_tokens", "context length"),
        (
            "/v1/chat/completions",
            {**CHAT, "max_completion_tokens": 300},
            "max_completion_tokens",
            "context length",
        ),
        ("/v1/completions", {"prompt": ["a" * 60, "b" * 41]}, "prompt", "--max-prompt-chars"),
        ("/v1/responses", {"input": "x" * 101}, "messages", "--max-prompt-chars"),
        ("/tokenize", {"prompt": "x" * 101}, "prompt", "--max-prompt-chars"),
    ],
)
def test_routes_refuse_over_the_caps_before_the_engine_sees_the_request(
    path: str, body: dict[str, Any], param: str, words: str
) -> None:
    fake, http = make(
        max_messages=3, max_prompt_chars=100, max_n=4, max_stop_strings=2, max_request_headers=50
    )
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", param, 400)
    assert words in error["message"]
    assert fake.requests == []
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


# ---------------------------------------------------------------- start-up


class Engine:
    def __init__(self) -> None:
        self.ready = False

    async def health(self, timeout: float = 5.0) -> HealthReply:
        return HealthReply("h", self.ready)


def test_start_up_gate_answers_503_with_retry_after_until_the_engine_is_ready() -> None:
    async def main() -> None:
        gate = StartupGate(Held())
        engine = Engine()
        watching = asyncio.ensure_future(gate.watch(engine, interval_s=0.01))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gate), base_url="http://t"
        ) as http:
            for path in ("/health", "/ping", "/v1/models", "/tokenize"):
                r = await http.get(path)
                assert r.status_code == 503 and r.headers["retry-after"] == "5", path
                assert r.json()["error"]["type"] == "ServiceUnavailableError"
            assert (await http.get("/metrics")).status_code == 200
            engine.ready = True
            await asyncio.wait_for(watching, 5)
            assert (await http.get("/health")).status_code == 200

    asyncio.run(main())


def test_public_metrics_leave_only_metrics_open() -> None:
    _, http = make(api_key="k", public_metrics=True)
    assert http.get("/metrics").status_code == 200
    assert http.get("/version").status_code == 401
    _, closed = make(api_key="k")
    assert closed.get("/metrics").status_code == 401
