"""`tool_choice` "required" and a named tool, as vLLM does them: the answer is held to a JSON
format by structured outputs (models/grammar.py), then read back as tool calls.

- a named tool: the answer is that tool's arguments object (its `parameters` schema);
- "required": the answer is a non-empty JSON array of `{"name", "parameters"}`, each name one of
  the request's tools with its own parameters schema.

`FORCED` / `forced_parser_name` name the answer's reader for convert.py and stream.py, beside the
model-format parsers of tool_parsers.py; the reader hands every call over at the end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from protocols.messages import StructuredOutput
from protocols.openai.errors import OpenAIError
from protocols.openai.tool_parsers import (
    ParsedDelta,
    ParsedMessage,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    make_parser,
    new_call_id,
    parse_tool_calls,
)

FORCED = "forced"  # parser name of "required"; a named tool's is "forced:<name>"


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise OpenAIError("each tool needs a function with a name", param="tools")
    return function


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    params = function.get("parameters")
    return params if isinstance(params, dict) else {"type": "object"}


def forced_format(
    tool_choice: Any, tools: list[dict[str, Any]] | None, parallel: bool = True
) -> tuple[str, StructuredOutput] | None:
    """(parser name, the format the answer is held to) for "required" or a named tool choice;
    None for the other choices. Without `parallel` (parallel_tool_calls: false) "required"
    makes exactly one call."""
    if not tools:
        return None
    if tool_choice == "required":
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"enum": [f["name"]]},
                    "parameters": _parameters(f),
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for f in map(_function, tools)
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
        if not parallel:
            schema["maxItems"] = 1
        return FORCED, StructuredOutput("json", json.dumps(schema))
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise OpenAIError(
                'a named tool_choice is {"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        for function in map(_function, tools):
            if function["name"] == name:
                schema = _parameters(function)
                return f"{FORCED}:{name}", StructuredOutput("json", json.dumps(schema))
        raise OpenAIError(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return None


class ForcedCallsParser:
    """Reads an answer held to a forced format: nothing until the end, then every call."""

    def __init__(self, name: str | None, make_id: Callable[[], str] = new_call_id) -> None:
        self.name = name  # the named tool; None: "required" (an array of calls)
        self.make_id = make_id
        self.text = ""
        self.calls: list[ToolCall] = []
        self.complete: list[bool] = []
        self.content = ""

    def feed(self, text: str) -> ParsedDelta:
        self.text += text
        return ParsedDelta()

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        try:
            value = json.loads(self.text)
        except json.JSONDecodeError:  # cut off by max_tokens: the text stays content
            return out
        found: list[tuple[Any, Any]] = []
        if self.name is not None:
            found = [(self.name, value)] if isinstance(value, dict) else []
        elif isinstance(value, list):
            found = [(c.get("name"), c.get("parameters")) for c in value if isinstance(c, dict)]
        for index, (name, arguments) in enumerate(found):
            if not isinstance(name, str):
                continue
            call = ToolCall(self.make_id(), name, json.dumps(arguments))
            self.calls.append(call)
            self.complete.append(True)
            out.tool_calls.append(ToolCallDelta(index, call.id, name, call.arguments))
        return out


def make_reader(name: str) -> ToolCallParser | ForcedCallsParser:
    """The incremental reader of an answer for parser `name` (a model format or a forced one)."""
    if name == FORCED:
        return ForcedCallsParser(None)
    if name.startswith(FORCED + ":"):
        return ForcedCallsParser(name.split(":", 1)[1])
    return make_parser(name)


def read_tool_calls(name: str, text: str) -> ParsedMessage:
    """A whole answer's calls for parser `name`; an answer with no readable call is content."""
    if name != FORCED and not name.startswith(FORCED + ":"):
        return parse_tool_calls(name, text)
    reader = make_reader(name)
    reader.feed(text)
    reader.finish()
    if not reader.calls:
        return ParsedMessage(text, [])
    return ParsedMessage(None, reader.calls)
