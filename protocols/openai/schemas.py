"""Pydantic models of the OpenAI request bodies Tessera accepts: field names, types and shapes.

First stop of an HTTP request: FastAPI checks the body's types against these before `convert`
runs. Types are strict (no "yes" for true, no 1.5 for an integer; an integer is accepted for a
number), and every integer, string and nesting level anywhere in a body must be one the engine's
wire can carry (64-bit integers, UTF-8 strings). Value rules (ranges, limits) are the engine's,
checked once for every request by actors/admission.py, so SDK and HTTP requests meet the same
rules. A field a body declares nowhere here is a 400 naming it: nothing a client asks for is
silently ignored (OpenAI's API refuses unknown arguments too; vLLM drops them with a warning).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from protocols.messages import utf8_text

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 64  # nesting levels of a body: content parts and tool schemas need a handful


class WireValueError(ValueError):
    """A body value the wire cannot carry; `param` is where it is (dotted path)."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(f"{param or 'body'}: {message}")
        self.param = param


def check_wire_values(data: Any) -> None:
    """Refuse (WireValueError naming where) what parses as JSON but cannot travel on the engine's
    wire: integers outside 64 bits, strings with lone surrogates (not UTF-8), deep nesting."""
    todo: list[tuple[Any, str, int]] = [(data, "", 0)]
    while todo:
        value, where, depth = todo.pop()
        if isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            continue
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                raise WireValueError("integer outside the 64-bit range", where or None)
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                raise WireValueError(f"nested more than {MAX_DEPTH} levels deep", where or None)
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                at = f"{where}.{utf8_text(str(key))}" if where else utf8_text(str(key))
                if isinstance(key, str):
                    _check_text(key, at)
                todo.append((item, at, depth + 1))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise WireValueError(
            "string holds a lone surrogate (not valid Unicode text)", where or None
        ) from None


class Body(BaseModel):
    """A request body (or part of one): an unknown field is a 400, types are strict."""

    model_config = ConfigDict(extra="forbid", strict=True)


class RequestBody(Body):
    """A whole request body: its values are checked for the wire first."""

    @model_validator(mode="before")
    @classmethod
    def _check_wire_values(cls, data: Any) -> Any:
        check_wire_values(data)
        return data


class StreamOptions(Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # with include_usage: usage so far on every chunk


class SamplingFields(RequestBody):
    """Fields shared by chat and text completions; names follow OpenAI and vLLM."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (a string) -> bias
    # Structured output, three ways (protocols/openai/structured.py reads them into one).
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None  # accepted and ignored


class TesseraOptions(Body):
    """Tessera's own request options (`"tessera": {...}`); an unknown one is a 400."""

    model_config = ConfigDict(extra="forbid", strict=True)

    boxes: bool = False  # return the answer's boxes mapped to each image's pixels


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None  # refused unless --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "function": {...}}]
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | a named tool
    parallel_tool_calls: bool | None = None  # false: only the first call is returned
    echo: bool = False  # vLLM's (the last message's text before the answer): refused
    tessera: TesseraOptions | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False  # the prompt's text (and, with logprobs, its tokens) before the answer
    prompt_logprobs: int | None = None  # vLLM's: each prompt token's logprob plus k others
    suffix: str | None = None
    best_of: int | None = None


class TokenizeCompletionRequest(RequestBody):
    """vLLM's /tokenize body for a plain prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(RequestBody):
    """vLLM's /tokenize body for chat messages, rendered with the server's chat template."""

    model: str | None = None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template: str | None = None  # refused unless --trust-request-chat-template
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeBody(RequestBody):
    """vLLM's /detokenize body (its DetokenizeRequest)."""

    model: str | None = None
    tokens: list[int]
