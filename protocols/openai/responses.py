"""OpenAI's Responses API (`POST /v1/responses`) over the chat path: a request's `input` and
`instructions` become chat messages (text and images), its answer a `response` object, or, in
streaming, the typed events the OpenAI SDK reads (response.created ... response.completed).

Stateless: `previous_response_id`, stored responses, tools and reasoning are refused with a 400.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from protocols.messages import RequestOutput
from protocols.openai.errors import OpenAIError
from protocols.openai.schemas import ChatCompletionRequest, RequestBody
from protocols.openai.stream import ChunkRenderer

REFUSED = (
    "previous_response_id",
    "tools",
    "tool_choice",
    "reasoning",
    "background",
    "include",
    "prompt",
    "conversation",
)


class ResponsesRequest(RequestBody):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool | None = None
    text: dict[str, Any] | None = None  # {"format": {"type": "json_schema", ...}}
    metadata: dict[str, str] | None = None
    user: str | None = None
    previous_response_id: Any = None
    tools: Any = None
    tool_choice: Any = None
    reasoning: Any = None
    background: Any = None
    include: Any = None
    prompt: Any = None
    conversation: Any = None


_PART_TYPES = {"input_text": "text", "output_text": "text", "text": "text"}


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIError("content must be a string or a list of parts", param=where)
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _PART_TYPES and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"]}})
        else:
            raise OpenAIError(
                f"content part type {kind!r} is not supported (input_text, input_image with an "
                "image_url, output_text)",
                param=f"{where}.{i}",
            )
    return parts


def chat_body(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat completion this response is."""
    for name in REFUSED:
        if getattr(req, name) not in (None, [], False):
            raise OpenAIError(f"{name} is not supported by this server's /v1/responses", param=name)
    if req.store:
        raise OpenAIError("responses are not stored here; send store: false", param="store")
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        for i, item in enumerate(req.input):
            role = item.get("role")
            if item.get("type", "message") != "message" or role not in (
                "user",
                "assistant",
                "system",
                "developer",
            ):
                raise OpenAIError(
                    "input items must be messages with a role (user, assistant, system, developer)",
                    param=f"input.{i}",
                )
            role = "system" if role == "developer" else role
            messages.append({"role": role, "content": _content(item.get("content"), f"input.{i}")})
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
    for ours, theirs in (
        ("max_output_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
    ):
        if getattr(req, ours) is not None:
            body[theirs] = getattr(req, ours)
    fmt = (req.text or {}).get("format")
    if fmt is not None and fmt.get("type") != "text":
        if fmt.get("type") == "json_schema":  # the Responses shape puts name/schema at the top
            body["response_format"] = {"type": "json_schema", "json_schema": fmt}
        else:
            body["response_format"] = fmt
    return ChatCompletionRequest.model_validate(body)


def _message(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": []}
    return {
        "type": "message",
        "id": item_id,
        "status": status,
        "role": "assistant",
        "content": [part] if status == "completed" or text else [],
    }


def response_object(
    response_id: str,
    created: int,
    model: str,
    item_id: str,
    text: str,
    final: RequestOutput | None,
    completion_tokens: int,
    metadata: dict[str, str] | None,
) -> dict[str, Any]:
    """The `response` object: in progress (final None) or finished."""
    status = "in_progress"
    incomplete = None
    if final is not None:
        status = "completed" if final.finish_reason != "length" else "incomplete"
        if status == "incomplete":
            incomplete = {"reason": "max_output_tokens"}
    usage = None
    if final is not None:
        done = final.completion_tokens or completion_tokens
        usage = {
            "input_tokens": final.prompt_tokens,
            "input_tokens_details": {"cached_tokens": final.cached_tokens},
            "output_tokens": done,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": final.prompt_tokens + done,
        }
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": [] if final is None else [_message(item_id, text, "completed")],
        "usage": usage,
        "incomplete_details": incomplete,
        "error": None,
        "metadata": metadata or {},
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
    }


def new_ids() -> tuple[str, str]:
    """(response id, output item id)."""
    return f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"


@dataclass
class ResponseEvents(ChunkRenderer):
    """The Responses API's streamed events for one answer."""

    item_id: str = ""
    metadata: dict[str, str] | None = None
    _text: str = field(default="", init=False)
    _seq: int = field(default=0, init=False)

    def _event(self, kind: str, **body: Any) -> dict[str, Any]:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **body}

    def _response(self, final: RequestOutput | None) -> dict[str, Any]:
        return response_object(
            self.response_id,
            self.created,
            self.model,
            self.item_id,
            self._text,
            final,
            self.completion_tokens,
            self.metadata,
        )

    def start(self) -> list[dict[str, Any]]:
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            self._event("response.created", response=self._response(None)),
            self._event("response.in_progress", response=self._response(None)),
            self._event(
                "response.output_item.added",
                output_index=0,
                item=_message(self.item_id, "", "in_progress"),
            ),
            self._event(
                "response.content_part.added",
                item_id=self.item_id,
                output_index=0,
                content_index=0,
                part=part,
            ),
        ]

    def render(self, out: RequestOutput) -> list[dict[str, Any]]:
        self.completion_tokens += len(out.token_ids)
        events = []
        if out.text:
            self._text += out.text
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=self.item_id,
                    output_index=0,
                    content_index=0,
                    delta=out.text,
                    logprobs=[],
                )
            )
        if out.finish_reason is not None:
            part = {"type": "output_text", "text": self._text, "annotations": []}
            where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
            events += [
                self._event("response.output_text.done", **where, text=self._text, logprobs=[]),
                self._event("response.content_part.done", **where, part=part),
                self._event(
                    "response.output_item.done",
                    output_index=0,
                    item=_message(self.item_id, self._text, "completed"),
                ),
                self._event("response.completed", response=self._response(out)),
            ]
        return events

    def choice(self, out: RequestOutput) -> dict[str, Any] | None:  # render() does it all
        return None

    def usage_chunk(self, usages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return []  # the usage is in response.completed
