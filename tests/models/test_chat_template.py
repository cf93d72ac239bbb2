"""Tests for models/chat_template.py and TextTokenizer.apply_chat_template: renders equal
transformers' for Qwen2.5 and SmolLM2 (GGUF); sandbox helpers and errors behave."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from tokenizers import Tokenizer, models

from models.chat_messages import template_messages
from models.chat_template import compile_chat_template, render_chat_template
from models.tokenizer import TextTokenizer
from tests.models.test_tokenizer import gguf_pair, qwen_pair

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Bonjour 😀, 你好"},
    ],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
    ],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — “quoted”",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_qwen_render_matches_transformers(messages: list, add_generation_prompt: bool) -> None:
    ours, ref = qwen_pair()
    expected = ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected


def test_qwen_render_with_tools_matches_transformers() -> None:
    ours, ref = qwen_pair()
    messages = CONVERSATIONS[0]
    expected = ref.apply_chat_template(
        messages, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    assert ours.apply_chat_template(messages, tools=TOOLS) == expected
    assert "“quoted”" in expected  # tojson keeps non-ASCII as is


def agent_loop(arguments: object) -> list[dict]:
    """An agent loop's second request: the assistant's call turn (content null, as OpenAI
    clients send it), the tool's result, then the turn to answer."""
    return [
        {"role": "system", "content": "Use tools when needed."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": f"call_{city}",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": args},
                }
                for city, args in zip(("p", "o"), arguments)  # type: ignore[call-overload]
            ],
        },
        {"role": "tool", "tool_call_id": "call_p", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_o", "content": '{"temp": 9}'},
    ]


CALL_ARGS = [{"city": "Paris"}, {"city": "Oslo", "unit": "°C"}]


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_qwen_agent_loop_matches_transformers(tools: list | None) -> None:
    """OpenAI-shaped messages (arguments as JSON text, content null) render as transformers
    renders the same conversation with argument objects, tool results included."""
    ours, ref = qwen_pair()
    openai_shaped = agent_loop([json.dumps(a) for a in CALL_ARGS])
    expected = ref.apply_chat_template(
        agent_loop(CALL_ARGS), tools=tools, tokenize=False, add_generation_prompt=True
    )
    text = ours.apply_chat_template(template_messages(openai_shaped, text_only=True), tools=tools)
    assert text == expected
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "°C"}}' in text
    )
    assert '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>' in text
    assert openai_shaped[2]["content"] is None  # the request is left alone


def test_agent_loop_renders_with_a_template_that_knows_no_tools() -> None:
    """SmolLM2's template concatenates content: a null content renders as "" (vLLM's), the
    tool message as a turn of its own."""
    ours, ref = gguf_pair()
    messages = agent_loop([json.dumps(a) for a in CALL_ARGS])
    expected = ref.apply_chat_template(
        [{**m, "content": m["content"] or ""} for m in agent_loop(CALL_ARGS)],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert ours.apply_chat_template(template_messages(messages, text_only=True)) == expected
    assert "<|im_start|>assistant\n<|im_end|>" in expected


def test_template_messages_shapes_null_content_and_arguments() -> None:
    call = {"type": "function", "function": {"name": "f", "arguments": ""}}
    messages: list[dict[str, Any]] = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    text = template_messages(messages, text_only=True)
    assert text == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}],
        }
    ]
    assert template_messages(messages, text_only=False)[0]["content"] == []  # no parts
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == ""


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_gguf_render_matches_transformers(messages: list) -> None:
    ours, ref = gguf_pair()
    expected = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(messages) == expected


def test_missing_template_raises_value_error() -> None:
    tok = TextTokenizer(Tokenizer(models.BPE()), chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_special_tokens_and_content_parts_reach_the_template() -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m.content is string %}{{ m.content }}"
        "{% else %}{% for p in m.content %}[{{ p.type }}]{% endfor %}{% endif %}{% endfor %}"
    )
    tok = TextTokenizer(
        Tokenizer(models.BPE()), chat_template=template, special_tokens={"bos_token": "<s>"}
    )
    parts = [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "t"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == "<s>[image_url][text]"
    assert tok.apply_chat_template([{"role": "user", "content": "a"}], bos_token="B") == "Ba"


def test_raise_exception_becomes_value_error() -> None:
    with pytest.raises(ValueError, match="roles must alternate"):
        render_chat_template("{{ raise_exception('roles must alternate') }}", [])


def test_bad_template_and_type_errors_become_value_error() -> None:
    with pytest.raises(ValueError, match="does not compile"):
        render_chat_template("{% for %}", [])
    with pytest.raises(ValueError):
        render_chat_template("{{ 'a' + messages[0].content }}", [{"role": "u", "content": [1]}])


def test_tojson_matches_json_dumps() -> None:
    data = {"b": "é", "a": [1, 2]}
    out = render_chat_template("{{ x | tojson }}|{{ x | tojson(indent=2) }}", [], x=data)
    assert out == json.dumps(data, ensure_ascii=False) + "|" + json.dumps(
        data, ensure_ascii=False, indent=2
    )
    assert render_chat_template("{{ '<a>' | tojson }}", []) == '"<a>"'


def test_strftime_now_loop_controls_and_trimming() -> None:
    assert render_chat_template("{{ strftime_now('%Y') }}", []) == str(datetime.now().year)
    template = (
        "{% for m in messages %}\n  {% if m == 2 %}{% break %}{% endif %}\n{{ m }}\n{% endfor %}"
    )
    assert render_chat_template(template, [1, 2, 3]) == "1\n"  # type: ignore[list-item]
    assert render_chat_template("{{ messages | length }}{{ tools }}", [{}]) == "1None"


def test_sandbox_blocks_attribute_escape() -> None:
    with pytest.raises(ValueError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [])
    with pytest.raises(ValueError):
        render_chat_template("{% set _ = messages.append(1) %}", [])


def test_template_compiled_once() -> None:
    source = "{{ messages | length }} compiled once"
    assert compile_chat_template(source) is compile_chat_template(source)


CONTINUED = [
    [{"role": "user", "content": "Count to five."}, {"role": "assistant", "content": "One, two,"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there  "},  # trailing spaces kept by the template
    ],
]


@pytest.mark.parametrize("messages", CONTINUED)
def test_continue_final_message_matches_transformers(messages: list) -> None:
    for ours, ref in (qwen_pair(), gguf_pair()):
        expected = ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
        )
        got = ours.apply_chat_template(messages, False, continue_final_message=True)
        assert got == expected
        assert got.endswith(messages[-1]["content"])  # left open: no end-of-turn token after it


def test_continue_final_message_in_the_last_text_part() -> None:
    template = "{% for m in messages %}[{% for p in m.content %}{{ p.text | trim }}{% endfor %}]{% endfor %}"
    parts = [{"type": "text", "text": "Look: "}, {"type": "text", "text": "a cat "}]
    messages = [{"role": "assistant", "content": parts}]
    # the template trims each part: the cut drops the trimmed space and the closing bracket
    assert render_chat_template(template, messages, False, True) == "[Look:a cat"
    assert parts[1]["text"] == "a cat "  # the caller's messages are left as they were


def test_continue_final_message_needs_text_the_template_renders() -> None:
    drops = "{% for m in messages %}{{ m.role }}{% endfor %}"
    with pytest.raises(ValueError, match="does not render the final message"):
        render_chat_template(drops, [{"role": "user", "content": "x"}], False, True)
    with pytest.raises(ValueError, match="no text to continue"):
        render_chat_template(drops, [{"role": "user", "content": None}], False, True)
