"""OpenAI chat messages reshaped for chat templates, as vLLM hands them over: null content,
content parts joined for text-only templates, tool-call arguments as objects. Called by the
tokenizer stage before rendering (models/chat_template.py)."""

from __future__ import annotations

import json
from typing import Any

_TEXT_PART = "text"


def template_messages(messages: list[dict[str, Any]], text_only: bool) -> list[dict[str, Any]]:
    """Copies of OpenAI messages (checked by actors.admission.parse_messages) in the form chat
    templates take, as vLLM hands them over: for a text-only template, content parts joined
    into one string and null content as ""; for a template of parts, null content as no parts;
    tool calls' arguments (JSON text on the API) as objects, which templates serialize."""
    shaped = []
    for message in messages:
        message = dict(message)
        if message.get("content") is None:
            message["content"] = "" if text_only else []
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message["tool_calls"] = [_call_with_object_arguments(call) for call in calls]
        shaped.append(message)
    return flatten_text_content(shaped) if text_only else shaped


def _call_with_object_arguments(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        function["arguments"] = json.loads(arguments) if arguments.strip() else {}
    elif arguments is None:
        function["arguments"] = {}
    return {**call, "function": function}


def flatten_text_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` whose list-of-parts content is joined into one string, for templates
    of text-only models. Takes text parts only (actors.admission.parse_messages checks parts)."""
    flat = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            kinds = {part.get("type") for part in content} - {_TEXT_PART}
            if kinds:
                raise ValueError(f"only text parts can be joined, got type {kinds.pop()!r}")
            text = "\n".join(part["text"] for part in content)
            message = {**message, "content": text}
        flat.append(message)
    return flat
