"""Tests for protocols/openai/tool_parsers.py: hermes (Qwen2.5) and llama3_json calls parsed from
whole answers and from answers fed in pieces, whose deltas add up to the whole parse; the Qwen2.5
chat template's own rendering of a call parses back to that call. Pure: no sockets."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from models.tokenizer import TextTokenizer
from protocols.openai.tool_parsers import (
    ParsedMessage,
    ToolCall,
    make_parser,
    parse_tool_calls,
)
from tests.fixtures.checkpoints import tokenizer_dir


def ids() -> Callable[[], str]:
    counter: Iterator[int] = iter(range(1000))
    return lambda: f"call_{next(counter)}"


def calls_of(parsed: ParsedMessage) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
NESTED = (
    '{"name": "search", "arguments": {"q": "a \\"quoted\\" }{ brace", '
    '"filters": [{"k": "x", "v": [1, 2.5e3, null, true]}], "u": "é"}}'
)

HERMES_CASES = [
    # (answer, content, calls)
    (
        f"<tool_call>\n{WEATHER}\n</tool_call>",
        None,
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    (
        f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{NESTED}\n</tool_call>",
        "Let me look.",
        [
            ("get_weather", {"city": "Paris", "days": 3}),
            ("search", json.loads(NESTED)["arguments"]),
        ],
    ),
    ('<tool_call>{"name": "now"}</tool_call>', None, [("now", {})]),  # no arguments: {}
    (  # arguments before the name
        '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>',
        None,
        [("f", {"x": 1})],
    ),
    (f"<tool_call>\n{WEATHER}\n", None, [("get_weather", {"city": "Paris", "days": 3})]),  # no end
    (
        f"A <tool_call>{WEATHER}</tool_call> then B",
        "A  then B",  # the text outside the call, as written
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
]


@pytest.mark.parametrize("answer,content,calls", HERMES_CASES)
def test_hermes_whole_answer(answer: str, content: str | None, calls: list) -> None:
    parsed = parse_tool_calls("hermes", answer, ids())
    assert parsed.content == content and calls_of(parsed) == calls
    assert [c.id for c in parsed.tool_calls] == [f"call_{i}" for i in range(len(calls))]


@pytest.mark.parametrize(
    "answer",
    [
        "Plain answer, no calls.  ",
        "",
        "a < b and <tool_ca",  # a prefix of the tag that never completes
        '<tool_call>{"nam": "f"}</tool_call> the JSON has no name',
        f"<tool_call>\n{WEATHER[:30]}",  # cut off by max_tokens inside the call
        '<tool_call>{"name": "f", "arguments": {"x": 1} oops}</tool_call>',  # not JSON
        "<tool_call>not json at all</tool_call>",
    ],
)
def test_hermes_answer_without_a_valid_call_is_content_unchanged(answer: str) -> None:
    assert parse_tool_calls("hermes", answer) == ParsedMessage(answer, [])


LLAMA_CASES = [
    ('{"name": "f", "parameters": {"x": 1}}', [("f", {"x": 1})]),
    ('<|python_tag|>{"name": "f", "arguments": {"x": 1}}', [("f", {"x": 1})]),
    (
        '  {"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {"y": [true]}}',
        [("f", {"x": 1}), ("g", {"y": [True]})],
    ),
]


@pytest.mark.parametrize("answer,calls", LLAMA_CASES)
def test_llama3_json_whole_answer(answer: str, calls: list) -> None:
    parsed = parse_tool_calls("llama3_json", answer, ids())
    assert parsed.content is None and calls_of(parsed) == calls


@pytest.mark.parametrize(
    "answer",
    ["The answer is 4.", 'Here: {"name": "f", "parameters": {}}', '{"city": "Paris"}', "<|py"],
)
def test_llama3_json_other_answers_are_content(answer: str) -> None:
    assert parse_tool_calls("llama3_json", answer) == ParsedMessage(answer, [])


# ---------------------------------------------------------------- streaming


def streamed(name: str, pieces: list[str]) -> tuple[str, list[dict]]:
    """Feed `pieces`; fold the deltas as the OpenAI SDK does: content concatenated, each call's
    id, type and name from its first delta, its argument fragments concatenated."""
    parser = make_parser(name, ids())
    content = ""
    calls: list[dict[str, str]] = []
    deltas = [parser.feed(p) for p in pieces] + [parser.finish()]
    for delta in deltas:
        content += delta.content
        for piece in delta.tool_calls:
            d = piece.openai()
            if d["index"] == len(calls):  # a new call opens with its id, type and name
                assert d["id"] and d["type"] == "function" and d["function"]["name"]
                calls.append({"id": d["id"], "name": d["function"]["name"], "arguments": ""})
            else:
                assert d["index"] == len(calls) - 1 and set(d) == {"index", "function"}
            calls[-1]["arguments"] += d["function"]["arguments"]
    return content, calls


def splits(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, at = [], 0
    while at < len(text):
        n = rng.randint(1, 6)
        pieces.append(text[at : at + n])
        at += n
    return pieces


STREAM_CASES = [("hermes", a) for a, _, _ in HERMES_CASES] + [
    ("llama3_json", a) for a, _ in LLAMA_CASES
]


@pytest.mark.parametrize("name,answer", STREAM_CASES)
@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_streamed_deltas_add_up_to_the_whole_parse(
    name: str, answer: str, seed: int | None
) -> None:
    whole = parse_tool_calls(name, answer, ids())
    pieces = list(answer) if seed is None else splits(answer, seed)
    content, calls = streamed(name, pieces)
    assert content == (whole.content or "")
    assert calls == [
        {"id": c.id, "name": c.name, "arguments": c.arguments} for c in whole.tool_calls
    ]


def test_streamed_arguments_arrive_in_fragments_before_the_call_ends() -> None:
    parser = make_parser("hermes", ids())
    first = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert [d.openai() for d in first.tool_calls] == [
        {
            "index": 0,
            "id": "call_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"ci'},
        }
    ]
    more = parser.feed('ty": "Paris"}}\n</tool')
    assert [d.openai() for d in more.tool_calls] == [
        {"index": 0, "function": {"arguments": 'ty": "Paris"}'}}
    ]
    assert parser.feed("_call>").tool_calls == [] and parser.finish().content == ""


def test_streamed_text_is_held_only_while_it_may_start_a_tag_or_is_whitespace() -> None:
    parser = make_parser("hermes")
    assert parser.feed("Sure").content == "Sure"
    assert parser.feed(" <tool").content == ""  # " " and "<tool" held
    assert parser.feed("box> is a tag").content == " <toolbox> is a tag"
    assert parser.feed("\n\n").content == ""
    assert parser.finish().content == "\n\n"  # no call: the answer's whitespace is kept


def test_whitespace_around_calls_is_not_content() -> None:
    parser = make_parser("hermes")
    answer = f"\n<tool_call>{WEATHER}</tool_call>\n\n<tool_call>{WEATHER}</tool_call>\n"
    assert [parser.feed(ch).content for ch in answer] == [""] * len(answer)
    assert parser.finish().content == "" and len(parser.calls) == 2


# ---------------------------------------------------------------- the Qwen2.5 template's calls


def test_calls_rendered_by_the_qwen_template_parse_back() -> None:
    """The Qwen2.5 template writes an assistant turn's calls in the format the model learned;
    the hermes parser reads that very text back into the same calls."""
    tok = TextTokenizer.load(str(tokenizer_dir()))
    args: list[dict[str, Any]] = [
        {"city": "Paris", "unit": "°C"},
        {"q": 'say "hi" {}', "n": [1, 2]},
    ]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather and a search?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": args[0]}},
                {"type": "function", "function": {"name": "search", "arguments": args[1]}},
            ],
        },
    ]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False)
    turn = rendered.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    assert turn.startswith("<tool_call>")
    parsed = parse_tool_calls("hermes", turn)
    assert parsed.content is None and calls_of(parsed) == [
        ("get_weather", args[0]),
        ("search", args[1]),
    ]
    content, calls = streamed("hermes", list(turn))
    assert content == "" and [json.loads(c["arguments"]) for c in calls] == args


def test_tool_call_openai_shape() -> None:
    call = ToolCall("call_1", "f", '{"x": 1}')
    assert call.openai() == {
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": '{"x": 1}'},
    }
