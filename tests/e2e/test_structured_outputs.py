"""Structured outputs through the real server with the official openai client: a random-weight
model, whose free answers are gibberish, answers schema-valid JSON under `response_format`
json_schema, one of the choices under vLLM's `structured_outputs`, a regex match under the legacy
`guided_regex`; a concurrent batch mixing constrained and free requests leaves the free ones as
they are alone; formats that cannot be enforced, or several at once, are 400s."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.e2e.test_openai_http import GREEDY, client

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["cat", "dog", "bird"]},
        "count": {"enum": [1, 2, 3]},
        "box": {"type": "array", "items": {"enum": [0, 10, 20]}, "minItems": 4, "maxItems": 4},
    },
    "required": ["label", "count", "box"],
    "additionalProperties": False,
}
MESSAGES: Any = [{"role": "user", "content": "Where is the animal? Answer in JSON."}]


def chat(server: Any, **kw: Any) -> Any:
    return client(server).chat.completions.create(
        model=server.model, messages=MESSAGES, max_tokens=60, **GREEDY, **kw
    )


def test_json_schema_answers_are_valid(server: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "animal", "schema": SCHEMA}}
    out = chat(server, response_format=fmt).choices[0]
    value = json.loads(out.message.content)
    assert out.finish_reason == "stop"
    assert value["label"] in ("cat", "dog", "bird") and value["count"] in (1, 2, 3)
    assert len(value["box"]) == 4 and set(value["box"]) <= {0, 10, 20}


def test_choice_and_regex_and_streaming(server: Any) -> None:
    choice = chat(server, extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert choice.choices[0].message.content in ("yes", "no", "maybe")
    regex = chat(server, extra_body={"guided_regex": r"[A-Z]{2}-[0-9]{3}"})
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", regex.choices[0].message.content)
    stream = client(server).chat.completions.create(
        model=server.model,
        messages=MESSAGES,
        max_tokens=60,
        stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
        **GREEDY,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert json.loads(text)["label"] in ("cat", "dog", "bird")


def test_completions_take_structured_outputs_too(server: Any) -> None:
    out = client(server).completions.create(
        model=server.model,
        prompt="The answer is",
        max_tokens=60,
        extra_body={"structured_outputs": {"json": SCHEMA}},
        **GREEDY,
    )
    assert out.choices[0].finish_reason == "stop"
    assert json.loads(out.choices[0].text)["count"] in (1, 2, 3)


def test_a_concurrent_mix_leaves_free_requests_as_they_are_alone(server: Any) -> None:
    def free(i: int) -> str:
        prompt: Any = [{"role": "user", "content": f"Tell me about number {i}."}]
        r = client(server).chat.completions.create(
            model=server.model, messages=prompt, max_tokens=8, **GREEDY
        )
        return r.choices[0].message.content or ""

    alone = [free(i) for i in range(3)]
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    with ThreadPoolExecutor(6) as pool:
        frees = [pool.submit(free, i) for i in range(3)]
        constrained = [pool.submit(chat, server, response_format=fmt) for _ in range(3)]
        assert [f.result() for f in frees] == alone
        for c in constrained:
            assert json.loads(c.result().choices[0].message.content)["count"] in (1, 2, 3)


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
            "json_schema.schema",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", "not supported"),
        ({"structured_outputs": {"regex": "[unclosed"}}, "response_format", "cannot be enforced"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty list"),
        (
            {"structured_outputs": {"json": {"type": "object"}, "regex": "a"}},
            "structured_outputs",
            "takes one of",
        ),
        (
            {"structured_outputs": {"backend": "xgrammar"}},
            "structured_outputs.backend",
            "not supported",
        ),
        ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, None, "not several"),
        (
            {"structured_outputs": {"grammar": "start: undefined_rule"}},
            "response_format",
            "cannot be enforced",
        ),
    ],
)
def test_formats_that_cannot_be_used_are_refused(
    server: Any, extra: dict[str, Any], param: str | None, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        chat(server, extra_body=extra)
    body = err.value.body
    assert isinstance(body, dict) and words in body["message"]
    assert body["param"] == param
    assert chat(server).choices[0].message.content is not None  # the server goes on
