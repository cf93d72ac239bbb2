"""Tool-call parsers: the calls a model writes in its text, as OpenAI `tool_calls`, whole or streamed.

Back path of a chat request with tools: generated text -> parser -> `message.tool_calls` (convert)
or `delta.tool_calls` chunks (stream). Formats, as vLLM names them: `hermes` (Qwen2.5, Hermes:
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) and `llama3_json` (Llama 3.x: the
answer is `{"name": ..., "parameters": {...}}`, several joined by `;`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PYTHON_TAG = "<|python_tag|>"  # Llama 3's tool-call prefix, when special tokens are kept
ARGUMENT_KEYS = ("arguments", "parameters")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    """A piece of call `index`: its id and name come first (once), then argument fragments
    whose concatenation is the arguments' JSON text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def openai(self) -> dict[str, Any]:
        """OpenAI's `delta.tool_calls[k]` shape."""
        if self.name is not None:
            return {
                "index": self.index,
                "id": self.id,
                "type": "function",
                "function": {"name": self.name, "arguments": self.arguments},
            }
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class ParsedDelta:
    """What one piece of generated text adds: text outside any call, and call pieces."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ParsedDelta) -> None:
        self.content += other.content
        self.tool_calls += other.tool_calls


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def openai(self) -> dict[str, Any]:
        """OpenAI's `message.tool_calls[k]` shape."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ParsedMessage:
    """A whole answer: `content` None when no text is left outside the calls."""

    content: str | None
    tool_calls: list[ToolCall]


class _CallBody:
    """Scans one call's JSON object as its text arrives: the name once its string is closed, the
    raw text of the arguments value as it is scanned (everything scanned inside the value is
    part of it), and where the object ends. Lenient while scanning; `valid` checks at the end."""

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # next character to scan
        self.depth = 0
        self.in_string = False
        self.escape = False
        self.expect = "open"  # open | key | colon | value | comma
        self.token_start = 0  # start of the key or depth-1 value being scanned
        self.key = ""
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None  # set when the arguments value is closed
        self.end: int | None = None  # just past the object's closing brace
        self.broken = False  # not a JSON object

    def feed(self, text: str) -> None:
        self.text += text
        while self.pos < len(self.text) and self.end is None and not self.broken:
            self._step(self.text[self.pos])
            self.pos += 1

    def _step(self, ch: str) -> None:
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.depth == 1:  # a key, or a string value at the top level closed
                    self._closed_top_token(self.pos + 1)
            return
        if self.depth == 1 and self.expect == "value" and self.token_start >= 0:
            if ch in ",}" or ch.isspace():  # a number, true, false or null just ended
                self._closed_top_token(self.pos)
        if ch.isspace():
            return
        if self.expect == "open":
            if ch != "{":
                self.broken = True
                return
            self.depth, self.expect = 1, "key"
            return
        if self.depth > 1:  # inside a nested value
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 1:
                    self._closed_top_token(self.pos + 1)
            return
        # depth 1: the call object's own keys and values
        if self.expect == "key":
            if ch == '"':
                self.in_string, self.token_start = True, self.pos
            elif ch == "}":
                self.end = self.pos + 1
            else:
                self.broken = True
        elif self.expect == "colon":
            if ch == ":":
                self.expect, self.token_start = "value", -1
            else:
                self.broken = True
        elif self.expect == "value":
            if self.token_start < 0:  # the value's first character
                self.token_start = self.pos
                if self.key in ARGUMENT_KEYS and self.args_start is None:
                    self.args_start = self.pos
                if ch == '"':
                    self.in_string = True
                elif ch in "{[":
                    self.depth += 1
        elif self.expect == "comma":
            if ch == ",":
                self.expect = "key"
            elif ch == "}":
                self.end = self.pos + 1
            else:
                self.broken = True

    def _closed_top_token(self, end: int) -> None:
        raw = self.text[self.token_start : end]
        if self.expect == "key":
            self.key = _loads(raw, "")
            self.expect = "colon"
            return
        if self.key == "name" and self.name is None:
            value = _loads(raw, None)
            self.name = value if isinstance(value, str) else None
        if self.args_start == self.token_start and self.args_end is None:
            self.args_end = end
        self.expect, self.token_start = "comma", 0

    def arguments_so_far(self) -> str:
        """The arguments' raw text scanned so far: all of it is the value's, for sure."""
        if self.args_start is None:
            return ""
        if self.args_end is not None:
            return self.text[self.args_start : self.args_end]
        if self.text[self.args_start] not in '{["':  # a bare number or literal: wait for its end
            return ""
        return self.text[self.args_start : self.pos]

    def valid(self) -> bool:
        if self.end is None or self.name is None:
            return False
        try:
            obj = json.loads(self.text[: self.end])
        except ValueError:
            return False
        return isinstance(obj, dict) and obj.get("name") == self.name


def _loads(raw: str, default: Any) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return default


class ToolCallParser:
    """Incremental parser of one answer: `feed` each new piece of text, then `finish`. The
    deltas' concatenation is the answer: content is the text outside the calls, whitespace kept
    back until text follows it (so the whitespace between and after calls is not content)."""

    # the marks around a call's JSON, given back as content when the JSON turns out no call
    OPEN = ""
    CLOSE = ""

    def __init__(self, make_id: Callable[[], str] = new_call_id) -> None:
        self.make_id = make_id
        self.calls: list[ToolCall] = []  # every call whose name was sent, valid or not
        self.complete: list[bool] = []  # per call: its JSON object closed and parsed
        self.content = ""  # all content sent so far
        self._held_space = ""
        self._body: _CallBody | None = None
        self._sent_call: _CallBody | None = None  # the body whose name was sent
        self._sent_args = 0  # characters of the current call's arguments already sent

    # -- subclasses: split text into outside text and call bodies ----------------------------

    def _scan(self, text: str, out: ParsedDelta) -> None:
        raise NotImplementedError

    def _flush(self, out: ParsedDelta) -> None:
        """End of the answer: hand back whatever text is still held."""
        raise NotImplementedError

    # -- the public surface -------------------------------------------------------------------

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        if text:
            self._scan(text, out)
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        self._flush(out)
        if self._body is not None:  # cut off inside a call (max_tokens)
            self._end_call(out, closed=False)
        if self._held_space and not self.calls:
            self._emit_content(self._held_space, out)
        self._held_space = ""
        return out

    # -- shared pieces ------------------------------------------------------------------------

    def _outside(self, text: str, out: ParsedDelta) -> None:
        """Text outside any call."""
        if not text:
            return
        if text.isspace():
            self._held_space += text
            return
        stripped = text.rstrip()
        self._emit_content(self._held_space + stripped, out)
        self._held_space = text[len(stripped) :]

    def _emit_content(self, text: str, out: ParsedDelta) -> None:
        self.content += text
        out.content += text

    def _start_call(self) -> None:
        self._body = _CallBody()
        self._sent_args = 0

    def _call_text(self, text: str, out: ParsedDelta) -> None:
        """More text of the current call's body; sends its name, then argument fragments."""
        body = self._body
        assert body is not None
        body.feed(text)
        index = len(self.calls)
        if body.name is not None and self._sent_call is not body:
            self.calls.append(ToolCall(self.make_id(), body.name, ""))
            self.complete.append(False)
            self._sent_call = body
            out.tool_calls.append(ToolCallDelta(index, self.calls[-1].id, body.name, ""))
        if self.calls and self._sent_call is body:
            args = body.arguments_so_far()
            if len(args) > self._sent_args:
                piece = args[self._sent_args :]
                self._sent_args = len(args)
                self.calls[-1].arguments += piece
                self._append_args(out, len(self.calls) - 1, piece)

    def _append_args(self, out: ParsedDelta, index: int, piece: str) -> None:
        last = out.tool_calls[-1] if out.tool_calls else None
        if last is not None and last.index == index:
            last.arguments += piece
        else:
            out.tool_calls.append(ToolCallDelta(index, arguments=piece))

    def _end_call(self, out: ParsedDelta, closed: bool = True) -> None:
        """Close the current call. A call that never showed a name was no call: its text, with
        its marks, is content."""
        body = self._body
        assert body is not None
        self._body = None
        if self._sent_call is not body:
            text = body.text if self.CLOSE else body.text[: body.end]
            self._outside(self.OPEN + text + (self.CLOSE if closed else ""), out)
            return
        index = len(self.calls) - 1
        self.complete[index] = body.valid()
        if body.valid() and body.args_start is None:  # a call without arguments: {}
            self.calls[index].arguments = "{}"
            self._append_args(out, index, "{}")


class HermesToolParser(ToolCallParser):
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them, between
    text (Qwen2.5 and Hermes 2/3 chat templates)."""

    START = OPEN = "<tool_call>"
    END = CLOSE = "</tool_call>"

    def __init__(self, make_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(make_id)
        self._pending = ""  # text held because it may begin a tag

    def _scan(self, text: str, out: ParsedDelta) -> None:
        self._pending += text
        while self._pending:
            tag = self.END if self._body is not None else self.START
            at = self._pending.find(tag)
            if at < 0:
                cut = len(self._pending) - _partial_suffix(self._pending, tag)
                ready, self._pending = self._pending[:cut], self._pending[cut:]
                self._piece(ready, out)
                return
            self._piece(self._pending[:at], out)
            self._pending = self._pending[at + len(tag) :]
            if self._body is None:
                self._start_call()
            else:
                self._end_call(out)

    def _piece(self, text: str, out: ParsedDelta) -> None:
        if self._body is None:
            self._outside(text, out)
        elif text:
            self._call_text(text, out)

    def _flush(self, out: ParsedDelta) -> None:
        text, self._pending = self._pending, ""
        self._piece(text, out)


class Llama3JsonToolParser(ToolCallParser):
    """Llama 3.x JSON tool calls: an answer that starts (after `<|python_tag|>`, if kept) with a
    JSON object holding `name` and `parameters` (or `arguments`) is calls, joined by `;`; any
    other answer is content."""

    def __init__(self, make_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(make_id)
        self._mode = "start"  # start | calls | between | text
        self._head = ""  # the answer's first characters, until its kind is known

    def _scan(self, text: str, out: ParsedDelta) -> None:
        if self._mode == "start":
            self._head += text
            head = self._head.lstrip()
            if head.startswith(PYTHON_TAG):
                head = head[len(PYTHON_TAG) :].lstrip()
            elif PYTHON_TAG.startswith(head):
                return  # "" or a prefix of the tag: not known yet
            if not head:
                return
            if head.startswith("{"):
                self._mode = "between"
                text = head
            else:
                self._mode = "text"
                text = self._head
            self._head = ""
        while text:
            if self._mode == "text":
                self._outside(text, out)
                return
            if self._mode == "between":
                stripped = text.lstrip().lstrip(";").lstrip()
                if not stripped:
                    return
                if not stripped.startswith("{"):
                    self._mode = "text"  # trailing words after the calls: content
                    text = stripped
                    continue
                self._mode = "calls"
                self._start_call()
                text = stripped
            body = self._body
            assert body is not None
            before = len(body.text)
            self._call_text(text, out)
            if body.end is None and not body.broken:
                return
            used = (body.end if body.end is not None else len(body.text)) - before
            text = text[used:] if body.end is not None else ""
            self._end_call(out)
            self._mode = "between"

    def _flush(self, out: ParsedDelta) -> None:
        if self._mode == "start" and self._head:
            self._mode = "text"
            self._outside(self._head, out)
            self._head = ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (to hold until more text comes)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


PARSERS: dict[str, type[ToolCallParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def make_parser(name: str, make_id: Callable[[], str] = new_call_id) -> ToolCallParser:
    return PARSERS[name](make_id)


def parse_tool_calls(
    name: str, text: str, make_id: Callable[[], str] = new_call_id
) -> ParsedMessage:
    """A whole answer's calls. As vLLM does, an answer with a call that is not complete, valid
    JSON (cut off by max_tokens, or malformed) is returned as content, with no calls."""
    parser = make_parser(name, make_id)
    parser.feed(text)
    parser.finish()
    if not parser.calls or not all(parser.complete):
        return ParsedMessage(text, [])
    return ParsedMessage(parser.content or None, parser.calls)
