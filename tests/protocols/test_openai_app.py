"""The OpenAI app's routes, auth, error mapping and SSE framing over a scripted fake engine client.

Exercises the HTTP hop alone: FastAPI app -> (fake) AsyncEngineClient, no processes or sockets.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable
from typing import Any

import openai
import orjson
import pytest
from starlette.testclient import TestClient

from actors.admission import RequestInvalid, check_sampling
from core.config import EngineConfig
from protocols.messages import EngineFacts, ErrorInfo, GenerateRequest, HealthReply, RequestOutput
from protocols.openai.app import build_app
from protocols.openai.stream import ChatChunks, sse

Script = Callable[[GenerateRequest], list[RequestOutput]]


def hello(req: GenerateRequest) -> list[RequestOutput]:
    rid = req.request_id
    return [
        RequestOutput(rid, text="Hel", token_ids=[1]),
        RequestOutput(
            rid,
            text="lo",
            token_ids=[2],
            finish_reason="stop",
            prompt_tokens=3,
            completion_tokens=2,
        ),
    ]


FACTS = EngineFacts(
    max_model_len=256,
    num_blocks=64,
    block_size=16,
    vocab_size=1000,
    eos_token_ids=[2],
    architecture="Qwen2ForCausalLM",
    dtype="float32",
)


class FakeClient:
    """Scripted outputs; sampling values are judged by the engine's real admission rules, as the
    tokenizer stage would (a refusal is an error output, like the engine's)."""

    def __init__(self, script: Script = hello, ready: bool = True) -> None:
        self.script, self.ready = script, ready
        self.requests: list[GenerateRequest] = []
        self.closed: list[str] = []

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[RequestOutput, None]:
        self.requests.append(request)
        try:
            try:
                check_sampling(request.sampling, FACTS.vocab_size)
            except RequestInvalid as exc:
                yield RequestOutput(request.request_id, finish_reason="error", error=exc.error)
                return
            for out in self.script(request):
                await asyncio.sleep(0)
                yield out
        finally:
            self.closed.append(request.request_id)

    async def health(self, timeout: float = 5.0) -> HealthReply:
        return HealthReply("h", self.ready, FACTS if self.ready else None)


def make(
    script: Script = hello,
    api_key: str | None = None,
    ready: bool = True,
    defaults: dict[str, Any] | None = None,
    **config: Any,
):
    fake = FakeClient(script, ready)
    fields: dict[str, Any] = {"served_model_name": ["tiny", "alias"], **config}
    engine_config = EngineConfig(model="/ckpt/tiny", api_key=api_key, **fields)
    return fake, TestClient(build_app(fake, engine_config, defaults))  # type: ignore[arg-type]


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def events(text: str) -> list[Any]:
    """The SSE data payloads: decoded JSON objects, and the final "[DONE]"."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            data = block[len("data: ") :]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


def test_chat_non_stream():
    fake, http = make()
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["model"] == "tiny"
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["usage"]["total_tokens"] == 5
    assert fake.closed == [fake.requests[0].request_id]


def test_model_omitted_uses_first_served_name():
    _, http = make()
    body = {"messages": CHAT["messages"]}
    assert http.post("/v1/chat/completions", json=body).json()["model"] == "tiny"


def test_chat_stream_with_usage():
    _, http = make()
    r = http.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hello"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_completion_stream_without_usage():
    _, http = make()
    r = http.post("/v1/completions", json={"model": "alias", "prompt": "x", "stream": True})
    chunks = events(r.text)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello"
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)


def refuse(req: GenerateRequest) -> list[RequestOutput]:
    info = ErrorInfo("This model's maximum context length is 256 tokens.", param="messages")
    return [RequestOutput(req.request_id, finish_reason="error", error=info)]


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusal_is_http_error_even_when_streaming(stream):
    _, http = make(refuse)
    r = http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and "context length" in err["message"]
    assert err["code"] == 400


def fail_midway(req: GenerateRequest) -> list[RequestOutput]:
    info = ErrorInfo("executor died", type="InternalServerError", code=500)
    return [
        RequestOutput(req.request_id, text="a", token_ids=[1]),
        RequestOutput(req.request_id, finish_reason="error", error=info),
    ]


def test_error_mid_stream_is_an_error_event_then_done():
    _, http = make(fail_midway)
    r = http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    evs = events(r.text)
    assert evs[-2] == {
        "error": {
            "message": "executor died",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    assert evs[-1] == "[DONE]"


def test_error_mid_generation_non_stream_is_http_500():
    _, http = make(fail_midway)
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 500


@pytest.mark.parametrize(
    "body,param",
    [
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "n": 0}, "n"),
        ({"model": "tiny"}, "messages"),
    ],
)
def test_adapter_refusals_are_400_openai_bodies(body, param):
    fake, http = make()
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400 and err["param"] == param
    assert fake.requests == []


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "body,param",
    [
        ({**CHAT, "temperature": -1}, "temperature"),
        ({**CHAT, "top_p": 2}, "top_p"),
        ({**CHAT, "logprobs": True, "top_logprobs": 21}, "logprobs"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_engine_value_refusals_are_400_openai_bodies(body, param, stream):
    _, http = make()
    route = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = http.post(route, json={**body, "stream": stream})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400 and err["param"] == param


def test_malformed_json_is_400():
    _, http = make()
    r = http.post(
        "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


def test_unknown_model_is_404():
    _, http = make()
    r = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json()["error"] == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


def test_models_list():
    _, http = make()
    body = http.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["tiny", "alias"]
    assert body["data"][0]["owned_by"] == "tessera" and body["data"][0]["max_model_len"] == 256
    assert http.get("/v1/models/alias").json()["id"] == "alias"
    assert http.get("/v1/models/other").status_code == 404


def test_health_and_version():
    _, http = make()
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]
    _, down = make(ready=False)
    assert down.get("/health").status_code == 503


def test_api_key_guards_v1_only():
    _, http = make(api_key="sekret")
    assert http.get("/health").status_code == 200
    r = http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = http.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200


def test_unknown_route_is_openai_404():
    _, http = make()
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"


def test_closing_the_event_stream_early_closes_the_engine_stream():
    fake = FakeClient(
        lambda req: [RequestOutput(req.request_id, text=str(i), token_ids=[i]) for i in range(100)]
    )

    async def main() -> None:
        req = GenerateRequest("rid")
        outputs = fake.generate(req)
        first = await outputs.__anext__()
        body = sse([first], [outputs], [ChatChunks("id", 1, "m", False, None)])
        assert b"role" in await body.__anext__()
        await body.__anext__()
        await body.aclose()

    asyncio.run(main())
    assert fake.closed == ["rid"]


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_ping_answers_like_health(method):
    _, http = make()
    assert http.request(method, "/ping").status_code == 200
    _, down = make(ready=False)
    assert down.request(method, "/ping").status_code == 503


def test_default_names_list_the_model_string_and_accept_the_folder_alias():
    # what resolve_model makes of `--model ckpt/tiny`: served as given, the folder as an alias
    fake, http = make(served_model_name=["ckpt/tiny"], model_aliases=["tiny"])
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["ckpt/tiny"]
    for name in ("ckpt/tiny", "tiny"):
        r = http.post("/v1/chat/completions", json={**CHAT, "model": name})
        assert r.status_code == 200 and r.json()["model"] == name
    assert http.get("/v1/models/tiny").status_code == 200
    assert http.post("/v1/chat/completions", json={**CHAT, "model": "ckpt"}).status_code == 404


def test_unknown_request_fields_are_400s_naming_them():
    fake, http = make()
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/v1/chat/completions", {**CHAT, "tessera_test_field": 1}, "tessera_test_field"),
        ("/v1/completions", {"prompt": "x", "frobnicate": 2}, "frobnicate"),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": True, "every": 1}},
            "stream_options.every",
        ),
    ]
    for route, body, param in cases:
        r = http.post(route, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and "unknown field" in error["message"]
    assert fake.requests == []


def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk():
    _, http = make()
    options = {"include_usage": True, "continuous_usage_stats": True}
    r = http.post("/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": options})
    chunks = events(r.text)[:-1]
    content = [c for c in chunks[1:-1] if c["choices"]]
    assert [c["usage"]["completion_tokens"] for c in content] == [1, 2]
    assert all(
        c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
        for c in content
    )
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    "route,body,status,param",
    [
        ("/tokenize", {"model": "tiny"}, 400, "prompt"),
        ("/tokenize", {"prompt": 3}, 400, "prompt"),
        ("/tokenize", {"messages": "hi"}, 400, "messages"),
        ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
        ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
        ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
    ],
)
def test_tokenize_bodies_refused_before_the_engine(route, body, status, param):
    _, http = make()
    r = http.post(route, json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param


def test_tokenize_needs_the_api_key_and_valid_json():
    _, http = make(api_key="sekret")
    assert http.post("/tokenize", json={"prompt": "x"}).status_code == 401
    assert http.post("/detokenize", json={"tokens": [1]}).status_code == 401
    _, http = make()
    bad = http.post("/tokenize", content=b"{no", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]


def test_cors_headers_only_for_allowed_origins():
    _, closed = make()
    asked = {"Origin": "https://a.example"}
    assert "access-control-allow-origin" not in closed.get("/v1/models", headers=asked).headers
    _, open_ = make(allowed_origins=["https://a.example"])
    r = open_.get("/v1/models", headers=asked)
    assert r.headers["access-control-allow-origin"] == "https://a.example"
    other = open_.get("/v1/models", headers={"Origin": "https://b.example"})
    assert "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------- list prompts, defaults, bias


def numbered(req: GenerateRequest) -> list[RequestOutput]:
    """Each prompt's request answers with its own id's last character, then finishes."""
    rid = req.request_id
    n = len(req.prompt or "")
    return [
        RequestOutput(rid, text=f"<{req.prompt}>", token_ids=[1]),
        RequestOutput(
            rid, token_ids=[2], finish_reason="length", prompt_tokens=n, completion_tokens=2
        ),
    ]


def test_completion_with_a_list_of_prompts_has_one_choice_each():
    fake, http = make(numbered)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "bbb", "cc"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [
        (0, "<a>"),
        (1, "<bbb>"),
        (2, "<cc>"),
    ]
    assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["completion_tokens"] == 6
    assert body["usage"]["total_tokens"] == 12
    rid = body["id"].removeprefix("cmpl-")
    assert [q.request_id for q in fake.requests] == [f"{rid}-{i}" for i in range(3)]
    assert sorted(fake.closed) == sorted(q.request_id for q in fake.requests)


def test_streamed_list_of_prompts_interleaves_choices_and_sums_usage():
    fake, http = make(numbered)
    body = {
        "model": "tiny",
        "prompt": ["a", "bbb"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = events(http.post("/v1/completions", json=body).text)
    assert chunks[-1] == "[DONE]"
    *choices, usage = chunks[:-1]
    text = {0: "", 1: ""}
    finishes = {}
    for c in choices:
        (choice,) = c["choices"]
        text[choice["index"]] += choice["text"]
        if choice["finish_reason"] is not None:
            finishes[choice["index"]] = choice["finish_reason"]
    assert text == {0: "<a>", 1: "<bbb>"} and finishes == {0: "length", 1: "length"}
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == 4
    assert usage["usage"]["completion_tokens"] == 4
    assert len({c["id"] for c in chunks[:-1]}) == 1
    assert sorted(fake.closed) == sorted(q.request_id for q in fake.requests)


def test_one_refused_prompt_refuses_the_batch_and_aborts_the_others():
    def refuse_second(req: GenerateRequest) -> list[RequestOutput]:
        if req.request_id.endswith("-1"):
            err = ErrorInfo("the prompt is empty", param="prompt")
            return [RequestOutput(req.request_id, finish_reason="error", error=err)]
        return hello(req)

    fake, http = make(refuse_second)
    for stream in (False, True):
        fake.closed.clear()
        body = {"model": "tiny", "prompt": ["a", "b", "c"], "stream": stream}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"] == "the prompt is empty"
        assert len(fake.closed) == 3


def test_unset_sampling_fields_take_the_generation_config_defaults():
    defaults = {"temperature": 0.3, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    fake, http = make(defaults=defaults)
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200
    s = fake.requests[-1].sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.min_p) == (
        0.3,
        0.8,
        20,
        1.05,
        0.0,
    )
    body = {"model": "tiny", "prompt": "x", "temperature": 0.0, "top_k": -1}
    assert http.post("/v1/completions", json=body).status_code == 200
    s = fake.requests[-1].sampling
    assert (s.temperature, s.top_k, s.top_p) == (0.0, -1, 0.8)  # the request's own win


def test_logit_bias_reaches_the_engine_and_bad_keys_are_400():
    fake, http = make()
    ok = http.post("/v1/chat/completions", json={**CHAT, "logit_bias": {"5": -100, "7": 2.5}})
    assert ok.status_code == 200
    assert fake.requests[-1].sampling.logit_bias == {5: -100.0, 7: 2.5}
    for bias, words in (({"five": 1}, "token ids"), ({"5": 101}, "[-100, 100]")):
        r = http.post("/v1/chat/completions", json={**CHAT, "logit_bias": bias})
        assert r.status_code == 400 and words in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "logit_bias"


# ---------------------------------------------------------------- tool calls, read by the SDK

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
# an answer in Qwen2.5's format, streamed by the engine a few characters at a time
ANSWER = (
    "Let me check both.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
    '{"name": "get_weather", "arguments": {"city": "Oslo, \\"NO\\""}}\n</tool_call>'
)


def answer_with_calls(req: GenerateRequest) -> list[RequestOutput]:
    pieces = [ANSWER[i : i + 4] for i in range(0, len(ANSWER), 4)]
    outs = [RequestOutput(req.request_id, text=p, token_ids=[1]) for p in pieces]
    outs[-1].finish_reason = "stop"
    outs[-1].prompt_tokens, outs[-1].completion_tokens = 3, len(pieces)
    return outs


def sdk(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(
        base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
    )


def test_the_openai_sdk_reads_tool_calls_whole_and_streamed():
    fake, http = make(answer_with_calls, enable_auto_tool_choice=True, tool_call_parser="hermes")
    client = sdk(http)
    kw: dict[str, Any] = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": TOOLS,
    }
    whole = client.chat.completions.create(**kw)
    assert fake.requests[-1].tools == TOOLS
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check both."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_weather", {"city": 'Oslo, "NO"'}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id
    # the SDK's own accumulation of the streamed deltas gives the same message
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert streamed.message.content == "Let me check both."
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls or []] == [
        (c.function.name, c.function.arguments) for c in calls
    ]


def test_tool_choice_none_shows_the_tools_and_leaves_the_answer_as_text():
    fake, http = make(answer_with_calls)  # no --enable-auto-tool-choice needed
    r = http.post("/v1/chat/completions", json={**CHAT, "tools": TOOLS, "tool_choice": "none"})
    assert r.status_code == 200 and fake.requests[-1].tools == TOOLS
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": ANSWER}
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "choice,enabled,words",
    [
        (None, False, '"auto" tool choice requires --enable-auto-tool-choice'),
        ({"type": "function", "function": {"name": "no_such_tool"}}, True, "not in tools"),
        ({"type": "function"}, True, "a named tool_choice is"),
    ],
)
def test_tool_choices_that_cannot_be_honoured_are_400_before_the_engine(choice, enabled, words):
    config: dict[str, Any] = {}
    if enabled:
        config = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
    fake, http = make(answer_with_calls, **config)
    body = {**CHAT, "tools": TOOLS, **({"tool_choice": choice} if choice else {})}
    for stream in (False, True):
        r = http.post("/v1/chat/completions", json={**body, "stream": stream})
        assert r.status_code == 400 and words in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "tool_choice"
    assert fake.requests == []
