"""End to end: tool definitions and an agent loop's turns (assistant `content: null` with
`tool_calls`, then `tool` results) reach the chat template through the real engine, and a server
started with --enable-auto-tool-choice --tool-call-parser hermes answers requests with tools,
streamed and whole alike. Official `openai` client; real processes and sockets.

A random-weight model does not write tool calls of its own accord; the parsing of calls is
proven in tests/protocols/test_openai_tool_parsers.py (on the Qwen2.5 template's own rendering
of calls) and test_openai_app.py (the SDK reading them); here the generated text is the model's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import transformers

from tests.e2e.conftest import SERVER_ARGS, _Server
from tests.e2e.engine_process import EngineProcess
from tests.fixtures.checkpoints import tokenizer_dir

TOOL_CALL_ID = 151657  # "<tool_call>" in the Qwen2.5 tokenizer (not a special token)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


def agent_loop(arguments: str | dict) -> list[dict[str, Any]]:
    """The second request of an agent loop, as OpenAI clients send it (arguments as JSON text),
    or as transformers' templates take it (arguments as an object)."""
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_abc",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp_c": 21}'},
    ]


@lru_cache(maxsize=1)
def reference() -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir()))


def reference_ids(messages: list[dict[str, Any]], tools: list | None) -> list[int]:
    ref = reference()
    text = ref.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    return list(ref.encode(text, add_special_tokens=False))


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=120)


GREEDY: dict[str, Any] = {"temperature": 0.0, "max_tokens": 6, "extra_body": {"ignore_eos": True}}


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_agent_loop_turns_render_as_transformers_renders_them(server: _Server, tools: Any) -> None:
    """content null + tool_calls + a tool message: 200, and the prompt the engine ran is
    transformers' rendering of the same conversation, tools included."""
    messages = agent_loop(json.dumps({"city": "Paris"}))
    expected = reference_ids(agent_loop({"city": "Paris"}), tools)
    extra = {"tools": tools, "tool_choice": "none"} if tools else {}
    r = client(server.base_url).chat.completions.create(
        model=server.model,
        messages=messages,  # type: ignore[arg-type]
        **GREEDY,
        **extra,
    )
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls is None
    assert r.usage is not None and r.usage.prompt_tokens == len(expected)
    root = server.base_url.removesuffix("/v1")
    tok = httpx.post(
        root + "/tokenize", json={"messages": messages, **({"tools": tools} if tools else {})}
    )
    assert tok.status_code == 200 and tok.json()["tokens"] == expected


def test_tools_without_auto_tool_choice_are_refused_like_vllm(server: _Server) -> None:
    c = client(server.base_url)
    kw: dict[str, Any] = {
        "model": server.model,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": TOOLS,
    }
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        c.chat.completions.create(**kw)
    forced = c.chat.completions.create(**kw, tool_choice="required", max_tokens=80)
    choice = forced.choices[0]
    if choice.finish_reason == "tool_calls":  # the random model may run out of tokens first
        assert choice.message.tool_calls and choice.message.content is None
    else:
        assert choice.finish_reason == "length"
    bad = agent_loop("{not json")
    with pytest.raises(openai.BadRequestError, match="not valid JSON") as e:
        c.chat.completions.create(model=server.model, messages=bad)  # type: ignore[arg-type]
    assert e.value.body["param"] == "messages.1.tool_calls.0.function.arguments"  # type: ignore[index]


@pytest.fixture(scope="module")
def tool_server(tiny_qwen2: Path) -> Iterator[_Server]:
    args = [*SERVER_ARGS, "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    eng = EngineProcess(str(tiny_qwen2), args).start()
    try:
        yield _Server(eng)
    finally:
        eng.stop()


def whole_and_streamed(server: _Server, **kw: Any) -> tuple[Any, dict[str, Any]]:
    """The whole answer's choice, and the streamed one folded as clients fold the deltas:
    content concatenated, each call's id and name from its first delta, arguments joined."""
    c = client(server.base_url)
    whole = c.chat.completions.create(model="tiny-qwen2", **kw)
    folded: dict[str, Any] = {"content": "", "tool_calls": [], "finish_reason": None}
    for chunk in c.chat.completions.create(model="tiny-qwen2", stream=True, **kw):
        choice = chunk.choices[0]
        folded["content"] += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            if call.index == len(folded["tool_calls"]):
                folded["tool_calls"].append({"id": call.id, "name": call.function.name})
                folded["tool_calls"][-1]["arguments"] = ""
            folded["tool_calls"][call.index]["arguments"] += call.function.arguments or ""
        folded["finish_reason"] = choice.finish_reason or folded["finish_reason"]
    return whole.choices[0], folded


def test_auto_tool_choice_answers_whole_and_streamed_alike(tool_server: _Server) -> None:
    kw: dict[str, Any] = {"messages": agent_loop(json.dumps({"city": "Paris"})), "tools": TOOLS}
    whole, streamed = whole_and_streamed(tool_server, **kw, **GREEDY)
    calls = [
        {"name": t.function.name, "arguments": json.loads(t.function.arguments)}
        for t in whole.message.tool_calls or []
    ]
    assert calls == [
        {"name": t["name"], "arguments": json.loads(t["arguments"])} for t in streamed["tool_calls"]
    ]
    assert (whole.message.content or "") == streamed["content"]
    assert whole.finish_reason == streamed["finish_reason"]
    assert whole.finish_reason == ("tool_calls" if calls else "length")


def test_generated_tags_that_hold_no_call_come_back_as_content(tool_server: _Server) -> None:
    """logit_bias makes the model write "<tool_call>" at every step: the parser holds the text
    while it may be a call, and when no call's JSON follows, it is the answer's content."""
    kw: dict[str, Any] = {
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": TOOLS,
        "logit_bias": {str(TOOL_CALL_ID): 100},
    }
    whole, streamed = whole_and_streamed(tool_server, **kw, **{**GREEDY, "max_tokens": 3})
    assert whole.message.content == "<tool_call>" * 3 == streamed["content"]
    assert not whole.message.tool_calls and streamed["tool_calls"] == []
    assert whole.finish_reason == "length" == streamed["finish_reason"]


CITY_TOOL: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Oslo", "Rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]


def test_named_and_required_tool_choices_force_valid_calls(server: _Server) -> None:
    """Held to the tool's schema by structured outputs, even a random model calls the tool."""
    c = client(server.base_url)
    base: dict[str, Any] = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": CITY_TOOL,
        "max_tokens": 40,
        "temperature": 0,
    }
    named = c.chat.completions.create(
        **base, tool_choice={"type": "function", "function": {"name": "get_weather"}}
    ).choices[0]
    assert named.finish_reason == "tool_calls" and named.message.content is None
    (call,) = named.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Oslo", "Rome")
    # parallel_tool_calls false: exactly one call (an array of them could run past max_tokens)
    one: dict[str, Any] = {**base, "tool_choice": "required", "parallel_tool_calls": False}
    required = c.chat.completions.create(**one).choices[0]
    assert required.finish_reason == "tool_calls"
    assert required.message.tool_calls and len(required.message.tool_calls) == 1
    for call in required.message.tool_calls:
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Oslo", "Rome")
    stream = c.chat.completions.create(**one, stream=True)
    deltas = [d for ch in stream if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function is not None
    assert deltas[0].function.name == "get_weather"
