"""OpenAI's Responses API (/v1/responses) through the official client: the answer equals the chat
completion of the same messages, streaming gives the SDK's typed events ending in
response.completed, `text.format` holds the answer to a schema, and stateful features are 400s."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.e2e.test_openai_http import client


def test_a_response_is_the_chat_answer_of_the_same_messages(server: Any) -> None:
    c = client(server)
    resp = c.responses.create(
        model=server.model,
        instructions="You are terse.",
        input="Name a colour.",
        max_output_tokens=6,
        temperature=0,
    )
    chat = c.chat.completions.create(
        model=server.model,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert resp.output_text == chat.choices[0].message.content
    assert resp.status in ("completed", "incomplete") and resp.id.startswith("resp_")
    assert resp.usage is not None and chat.usage is not None
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens


def test_streaming_gives_the_sdk_events(server: Any) -> None:
    c = client(server)
    kinds, text = [], ""
    final = None
    with c.responses.stream(
        model=server.model,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
        max_output_tokens=6,
        temperature=0,
    ) as stream:
        for ev in stream:
            kinds.append(ev.type)
            if ev.type == "response.output_text.delta":
                text += ev.delta
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds and "response.output_item.done" in kinds
    assert final.output_text == text


def test_text_format_holds_the_answer_to_a_schema(server: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"enum": [True, False]}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    resp = client(server).responses.create(
        model=server.model,
        input="Is it fine?",
        max_output_tokens=20,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "v", "schema": schema}},
    )
    assert json.loads(resp.output_text)["ok"] in (True, False)


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "web_search"}]}, "tools"),
    ],
)
def test_stateful_features_are_refused(server: Any, kw: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client(server).responses.create(model=server.model, input="hi", **kw)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == param
