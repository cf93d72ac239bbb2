"""The OpenAI and vLLM ways of asking for structured output, read into one StructuredOutput.

`response_format` (OpenAI: text, json_object, json_schema), `structured_outputs` (vLLM: json,
regex, choice, grammar, json_object) and vLLM's older top-level `guided_json`, `guided_regex`,
`guided_choice`, `guided_grammar` all end here; asking in two ways at once is a 400. Whether the
format can be enforced with the model's tokenizer is checked later, by the tokenizer stage.
"""

from __future__ import annotations

import json
from typing import Any

from protocols.messages import StructuredOutput
from protocols.openai.errors import OpenAIError

STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
GUIDED_KEYS = {
    "guided_json": "json",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}
ANY_JSON_OBJECT = json.dumps({"type": "object"})


def _schema_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return json.dumps(value)
    raise OpenAIError("a JSON schema must be an object (or its text)", param=param)


def _from_response_format(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise OpenAIError("response_format must be an object with a type", param="response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json", ANY_JSON_OBJECT)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise OpenAIError(
                "response_format json_schema needs json_schema.schema",
                param="response_format.json_schema",
            )
        return StructuredOutput(
            "json", _schema_text(spec["schema"], "response_format.json_schema.schema")
        )
    raise OpenAIError(
        f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
        param="response_format.type",
    )


def _from_structured_outputs(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict):
        raise OpenAIError("structured_outputs must be an object", param="structured_outputs")
    unknown = sorted(set(value) - set(STRUCTURED_KEYS))
    if unknown:
        raise OpenAIError(
            f"structured_outputs.{unknown[0]} is not supported; use one of "
            + ", ".join(STRUCTURED_KEYS),
            param=f"structured_outputs.{unknown[0]}",
        )
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    if len(given) > 1:
        raise OpenAIError(
            "structured_outputs takes one of " + ", ".join(STRUCTURED_KEYS) + f", got {given}",
            param="structured_outputs",
        )
    if not given:
        return None
    return _one(given[0], value[given[0]], f"structured_outputs.{given[0]}")


def _one(kind: str, value: Any, param: str) -> StructuredOutput:
    if kind == "json_object":
        return StructuredOutput("json", ANY_JSON_OBJECT)
    if kind == "json":
        return StructuredOutput("json", _schema_text(value, param))
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
            raise OpenAIError("choice must be a non-empty list of strings", param=param)
        return StructuredOutput("choice", json.dumps(value))
    if not isinstance(value, str) or not value:
        raise OpenAIError(f"{kind} must be a non-empty string", param=param)
    return StructuredOutput(kind, value)


def structured_output(
    response_format: Any, structured_outputs: Any, guided: dict[str, Any]
) -> StructuredOutput | None:
    """The request's one structured-output constraint, or None. `guided` holds the legacy
    guided_* fields that were set."""
    found: list[tuple[str, StructuredOutput | None]] = []
    if response_format is not None:
        found.append(("response_format", _from_response_format(response_format)))
    if structured_outputs is not None:
        found.append(("structured_outputs", _from_structured_outputs(structured_outputs)))
    for name, value in guided.items():
        if value is not None:
            found.append((name, _one(GUIDED_KEYS[name], value, name)))
    asked = [(name, out) for name, out in found if out is not None]
    if len(asked) > 1:
        names = ", ".join(name for name, _ in asked)
        raise OpenAIError(f"give one structured output format, not several ({names})", param=None)
    return asked[0][1] if asked else None
