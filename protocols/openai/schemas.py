"""Pydantic models of the OpenAI request bodies Tessera accepts: field names, types and shapes.

First stop of an HTTP request: FastAPI checks the body's types against these before `convert`
runs. Value rules (ranges, limits) are the engine's, checked once for every request by
actors/admission.py, so SDK and HTTP requests meet the same rules. Fields a body declares
nowhere here are dropped, each name logged once (debug level).
"""

from __future__ import annotations

from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, model_validator

_unknown_seen: set[str] = set()  # field names already logged


class Body(BaseModel):
    """A request body (or part of one): unknown fields are ignored, as OpenAI's API does, and
    each unknown field name is logged the first time it is seen."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in sorted(str(k) for k in data.keys() - cls.model_fields.keys()):
                if name not in _unknown_seen:
                    _unknown_seen.add(name)
                    structlog.get_logger().debug(
                        "unknown request field ignored", actor="http", field=name, body=cls.__name__
                    )
        return data


class StreamOptions(Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted, not implemented


class SamplingFields(Body):
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
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None  # accepted and ignored


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # [{"type": "function", "function": {...}}]
    tool_choice: str | dict[str, Any] | None = None  # none | auto | required | a named tool
    parallel_tool_calls: bool | None = None  # false: only the first call is returned


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeCompletionRequest(Body):
    """vLLM's /tokenize body for a plain prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(Body):
    """vLLM's /tokenize body for chat messages, rendered with the server's chat template."""

    model: str | None = None
    messages: list[dict[str, Any]]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None


class DetokenizeBody(Body):
    """vLLM's /detokenize body (its DetokenizeRequest)."""

    model: str | None = None
    tokens: list[int]
