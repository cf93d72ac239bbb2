"""Reading the OpenAI and vLLM structured-output fields into one StructuredOutput (pure)."""

from __future__ import annotations

import json

import pytest

from protocols.messages import StructuredOutput
from protocols.openai.errors import OpenAIError
from protocols.openai.structured import structured_output

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize(
    ("response_format", "structured", "guided", "want"),
    [
        (None, None, {}, None),
        ({"type": "text"}, None, {}, None),
        ({"type": "json_object"}, None, {}, StructuredOutput("json", '{"type": "object"}')),
        (
            {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}},
            None,
            {},
            StructuredOutput("json", json.dumps(SCHEMA)),
        ),
        (None, {"json": json.dumps(SCHEMA)}, {}, StructuredOutput("json", json.dumps(SCHEMA))),
        (None, {"choice": ["a", "b"]}, {}, StructuredOutput("choice", '["a", "b"]')),
        (None, {"regex": "x+"}, {}, StructuredOutput("regex", "x+")),
        (None, {"grammar": 'start: "a"'}, {}, StructuredOutput("grammar", 'start: "a"')),
        (None, {"json_object": True}, {}, StructuredOutput("json", '{"type": "object"}')),
        (None, {"json": None, "regex": "y"}, {}, StructuredOutput("regex", "y")),
        (None, None, {"guided_choice": ["c"]}, StructuredOutput("choice", '["c"]')),
        (None, None, {"guided_json": SCHEMA}, StructuredOutput("json", json.dumps(SCHEMA))),
        (None, None, {"guided_regex": None}, None),
    ],
)
def test_every_way_of_asking_reads_the_same(
    response_format: object, structured: object, guided: dict, want: StructuredOutput | None
) -> None:
    assert structured_output(response_format, structured, guided) == want


@pytest.mark.parametrize(
    ("response_format", "structured", "guided", "param"),
    [
        ("json", None, {}, "response_format"),
        ({"type": "json_schema"}, None, {}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"schema": 3}},
            None,
            {},
            "response_format.json_schema.schema",
        ),
        (None, ["json"], {}, "structured_outputs"),
        (None, {"regex": ""}, {}, "structured_outputs.regex"),
        (None, {"choice": ["a", 1]}, {}, "structured_outputs.choice"),
        (None, {"whitespace_pattern": " "}, {}, "structured_outputs.whitespace_pattern"),
        ({"type": "json_object"}, {"regex": "a"}, {}, None),
    ],
)
def test_malformed_requests_name_the_field(
    response_format: object, structured: object, guided: dict, param: str | None
) -> None:
    with pytest.raises(OpenAIError) as err:
        structured_output(response_format, structured, guided)
    assert err.value.info.param == param and err.value.info.code == 400
