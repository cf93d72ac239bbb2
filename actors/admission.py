"""Admission: every rule a request must meet before it is scheduled, each written and checked once.

The tokenizer stage (which every request passes, SDK or HTTP) applies them; the gateway checks
the request id it routes by; the image stage resolves max_tokens once image placeholders are
expanded. A refusal is a 400 naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Any

from protocols.limits import (
    LimitExceeded,
    RequestLimits,
    check_messages,
    check_prompts,
    check_stop,
    image_limit,
)
from protocols.messages import ErrorInfo, GenerateRequest, SamplingParams

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range of a logit_bias value
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")
TEXT_PART = "text"
IMAGE_PARTS = ("image_url", "image")  # {"type": "image_url", "image_url": {"url"}} or "image"
MM_PROCESSOR_KWARGS = ("min_pixels", "max_pixels")
RESERVED_TEMPLATE_KWARGS = ("messages", "add_generation_prompt", "continue_final_message")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what an integer on the wire may hold

# Value ranges of the float sampling fields: (low, low included, high); high is always included.
_FLOAT_RANGES: dict[str, tuple[float, bool, float]] = {
    "temperature": (0.0, True, math.inf),
    "top_p": (0.0, False, 1.0),
    "min_p": (0.0, True, 1.0),
    "presence_penalty": (-2.0, True, 2.0),
    "frequency_penalty": (-2.0, True, 2.0),
    "repetition_penalty": (0.0, False, math.inf),
}
_BOOL_FIELDS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


class RequestInvalid(ValueError):
    """A request refused with a 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    @property
    def error(self) -> ErrorInfo:
        return ErrorInfo(str(self), param=self.param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _interval(low: float, low_in: bool, high: float) -> str:
    if high == math.inf:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}]"


# ---------------------------------------------------------------- the prompt


def check_request_id(request_id: Any) -> None:
    """A non-empty string: the engine routes every record of a request by it."""
    if not isinstance(request_id, str) or not request_id:
        raise RequestInvalid("request_id must be a non-empty string", param="request_id")


def check_prompt_form(req: GenerateRequest) -> str:
    """Exactly one of prompt, prompt_token_ids or messages, of the right type; returns its field
    name as errors about the prompt should name it ("prompt" for token ids too, as OpenAI does)."""
    given = [
        name
        for name in ("prompt", "prompt_token_ids", "messages")
        if getattr(req, name) is not None
    ]
    if len(given) != 1:
        raise RequestInvalid("give exactly one of prompt, prompt_token_ids or messages")
    if req.prompt is not None and not isinstance(req.prompt, str):
        raise RequestInvalid("prompt must be a string", param="prompt")
    if req.prompt_token_ids is not None and not isinstance(req.prompt_token_ids, list):
        raise RequestInvalid("prompt_token_ids must be a list of token ids", param="prompt")
    return "messages" if req.messages is not None else "prompt"


def check_size(req: GenerateRequest, limits: RequestLimits) -> None:
    """The server's size caps (protocols/limits.py: messages, images, prompt characters, stop
    strings), checked before the chat template or the tokenizer runs."""
    try:
        check_stop(req.sampling.stop, limits)
        if req.messages is not None:
            check_messages(req.messages, req.tools, limits)
        elif req.prompt is not None:
            check_prompts([req.prompt], limits)
    except LimitExceeded as exc:
        raise RequestInvalid(str(exc), param=exc.param) from None


def check_prompt_ids(ids: list[Any], vocab_size: int, param: str) -> None:
    """The prompt as the engine will run it: not empty, every id inside the vocabulary."""
    if not ids:
        raise RequestInvalid("the prompt is empty", param=param)
    for t in ids:
        if not _is_int(t) or not 0 <= t < vocab_size:
            raise RequestInvalid(
                f"token id {t!r} is outside the vocabulary [0, {vocab_size})", param=param
            )


# ---------------------------------------------------------------- chat messages


def parse_messages(messages: Any, accepts_images: bool) -> list[str]:
    """Check OpenAI chat messages and return the image sources of their parts, in prompt order.

    The one reader of content parts: content is a string, null, or a list of parts, and every
    part is an object with a string `type`: "text" (with a string `text`), "image_url" (with
    `image_url` a URL string or {"url": ...}) or "image" (with `image` a URL string). A part
    without `type` is refused, as OpenAI does."""
    if not isinstance(messages, list) or not messages:
        raise RequestInvalid("messages must be a non-empty list", param="messages")
    sources: list[str] = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise RequestInvalid(f"{where} must be an object", param=where)
        role = message.get("role")
        if not isinstance(role, str):
            raise RequestInvalid(f"{where} needs a string 'role'", param=f"{where}.role")
        if role not in CHAT_ROLES:
            raise RequestInvalid(
                f"{where}.role {role!r} is not one of {', '.join(CHAT_ROLES)}",
                param=f"{where}.role",
            )
        if message.get("tool_calls") is not None:
            check_tool_calls(message["tool_calls"], f"{where}.tool_calls")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RequestInvalid(
                f"{where}.content must be a string or a list of content parts",
                param=f"{where}.content",
            )
        for k, part in enumerate(content):
            url = _image_source(part, f"{where}.content.{k}")
            if url is None:
                continue
            if not accepts_images:
                raise RequestInvalid(
                    "this model accepts text only: remove the image parts",
                    param=f"{where}.content.{k}",
                )
            sources.append(url)
    return sources


def _image_source(part: Any, where: str) -> str | None:
    """The URL of an image part; None for a text part; RequestInvalid for anything else."""
    if not isinstance(part, dict):
        raise RequestInvalid(f"{where} must be an object", param=where)
    kind = part.get("type")
    if not isinstance(kind, str):
        raise RequestInvalid(
            f"{where} needs a string 'type' ('text' or 'image_url')", param=f"{where}.type"
        )
    if kind == TEXT_PART:
        if not isinstance(part.get("text"), str):
            raise RequestInvalid(f"{where} needs a string 'text'", param=f"{where}.text")
        return None
    if kind not in IMAGE_PARTS:
        raise RequestInvalid(f"unsupported content part type {kind!r}", param=f"{where}.type")
    url = part.get(kind)
    if kind == "image_url" and isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise RequestInvalid(f"{where} needs an image URL string", param=f"{where}.{kind}")
    return url


def check_tool_calls(calls: Any, where: str) -> None:
    """An assistant turn's `tool_calls`: OpenAI's [{"id", "type": "function", "function":
    {"name", "arguments"}}], arguments a JSON object's text (or the object itself)."""
    if not isinstance(calls, list):
        raise RequestInvalid(f"{where} must be a list of tool calls", param=where)
    for k, call in enumerate(calls):
        at = f"{where}.{k}"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RequestInvalid(
                f'{at} must be {{"type": "function", "function": {{"name": ..., '
                '"arguments": ...}}',
                param=f"{at}.function",
            )
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments.strip():
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise RequestInvalid(
                    f"{at}.function.arguments is not valid JSON", param=f"{at}.function.arguments"
                ) from None
        if not (arguments is None or isinstance(arguments, (dict, str))):
            raise RequestInvalid(
                f"{at}.function.arguments must be a JSON object", param=f"{at}.function.arguments"
            )


def check_tools(tools: Any) -> None:
    """OpenAI tool definitions: [{"type": "function", "function": {"name", ...}}]."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise RequestInvalid("tools must be a list of tool definitions", param="tools")
    for k, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if (
            not isinstance(tool, dict)
            or tool.get("type", "function") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
            or not function["name"]
        ):
            raise RequestInvalid(
                f'tools.{k} must be {{"type": "function", "function": {{"name": ...}}}}',
                param=f"tools.{k}",
            )


def check_generation_prompt(add_generation_prompt: Any, continue_final_message: Any) -> None:
    """A chat either ends with the header of a new assistant turn or leaves its final message
    open for the model to continue, not both (vLLM's and transformers' rule)."""
    for name, value in (
        ("add_generation_prompt", add_generation_prompt),
        ("continue_final_message", continue_final_message),
    ):
        if not isinstance(value, bool):
            raise RequestInvalid(f"{name} must be true or false", param=name)
    if add_generation_prompt and continue_final_message:
        raise RequestInvalid(
            "continue_final_message and add_generation_prompt cannot both be true: set "
            "add_generation_prompt to false to continue the final message",
            param="continue_final_message",
        )


def check_template_kwargs(kwargs: Any) -> None:
    """chat_template_kwargs: an object whose keys do not replace what the engine passes (any
    other name is safe: models.chat_template takes the variables as a mapping)."""
    if not isinstance(kwargs, dict):
        raise RequestInvalid("chat_template_kwargs must be an object", param="chat_template_kwargs")
    taken = [k for k in RESERVED_TEMPLATE_KWARGS if k in kwargs]
    if taken:
        raise RequestInvalid(
            f"chat_template_kwargs may not set {taken[0]!r}", param="chat_template_kwargs"
        )


def request_chat_template(
    chat_template: Any, template_kwargs: dict[str, Any], trusted: bool
) -> str | None:
    """The chat template a request brings (`chat_template`, or one in chat_template_kwargs as
    transformers takes it), None if it brings none. Rendering a client's template runs code of
    its choosing, so it is refused unless the server runs with --trust-request-chat-template
    (vLLM's rule and wording)."""
    template = chat_template
    param = "chat_template"
    if template is None and template_kwargs.get("chat_template") is not None:
        template, param = template_kwargs["chat_template"], "chat_template_kwargs"
    if template is None:
        return None
    if not trusted:
        raise RequestInvalid(
            "Chat template is passed with request, but --trust-request-chat-template is not "
            "set. Refused request with untrusted chat template.",
            param=param,
        )
    if not isinstance(template, str) or not template:
        raise RequestInvalid("chat_template must be a non-empty string", param=param)
    return template


def check_image_count(n_images: int, limits: dict[str, int]) -> None:
    """No more images than the server's --limit-mm-per-prompt allows (worded as vLLM; 64
    when it names no image limit)."""
    limit = image_limit(limits)
    if n_images > limit:
        raise RequestInvalid(
            f"At most {limit} image(s) may be provided in one prompt (--limit-mm-per-prompt); "
            f"this request has {n_images}",
            param="messages",
        )


def check_image_placeholders(ids: list[int], image_token_id: int, n_images: int) -> None:
    """The chat template put exactly one placeholder per image."""
    placed = ids.count(image_token_id)
    if placed != n_images:
        raise RequestInvalid(
            f"the chat template placed {placed} image placeholders for {n_images} images",
            param="messages",
        )


def mm_processor_kwargs(kwargs: Any) -> dict[str, int]:
    """The per-request image processor overrides Tessera implements (integers)."""
    if not isinstance(kwargs, dict):
        raise RequestInvalid("mm_processor_kwargs must be an object", param="mm_processor_kwargs")
    unknown = sorted(set(kwargs) - set(MM_PROCESSOR_KWARGS))
    if unknown:
        raise RequestInvalid(
            f"unsupported mm_processor_kwargs: {unknown}", param="mm_processor_kwargs"
        )
    for key, value in kwargs.items():
        if not _is_int(value):
            raise RequestInvalid(
                f"mm_processor_kwargs.{key} must be an integer", param=f"mm_processor_kwargs.{key}"
            )
    return dict(kwargs)


# ---------------------------------------------------------------- sampling


def check_sampling(sp: SamplingParams, vocab_size: int, max_logprobs: int = MAX_LOGPROBS) -> None:
    """Types and value ranges of every sampling field (names and ranges follow vLLM);
    `max_logprobs` is the server's --max-logprobs (-1: up to the vocabulary)."""
    top = vocab_size if max_logprobs < 0 else max_logprobs
    for name, (low, low_in, high) in _FLOAT_RANGES.items():
        value = getattr(sp, name)
        if not _is_number(value) or not (low <= value if low_in else low < value) or value > high:
            raise RequestInvalid(
                f"{name} must be {_interval(low, low_in, high)}, got {value!r}", param=name
            )
    if not _is_int(sp.top_k) or sp.top_k < -1:
        raise RequestInvalid(f"top_k must be -1, 0 (off) or positive, got {sp.top_k!r}", "top_k")
    if sp.max_tokens is not None and (not _is_int(sp.max_tokens) or sp.max_tokens < 1):
        raise RequestInvalid(f"max_tokens must be at least 1, got {sp.max_tokens!r}", "max_tokens")
    if not _is_int(sp.min_tokens) or sp.min_tokens < 0:
        raise RequestInvalid(f"min_tokens must be >= 0, got {sp.min_tokens!r}", "min_tokens")
    if sp.logprobs is not None and (not _is_int(sp.logprobs) or not 0 <= sp.logprobs <= top):
        raise RequestInvalid(
            f"logprobs must be in [0, {top}] (top_logprobs for chat; the server's "
            f"--max-logprobs), got {sp.logprobs!r}",
            param="logprobs",
        )
    if sp.prompt_logprobs is not None and (
        not _is_int(sp.prompt_logprobs) or not 0 <= sp.prompt_logprobs <= top
    ):
        raise RequestInvalid(
            f"prompt_logprobs must be in [0, {top}] (the server's --max-logprobs), "
            f"got {sp.prompt_logprobs!r}",
            param="prompt_logprobs",
        )
    if sp.seed is not None and (not _is_int(sp.seed) or not INT64_MIN <= sp.seed <= INT64_MAX):
        raise RequestInvalid(
            f"seed must be an integer in [{INT64_MIN}, {INT64_MAX}], got {sp.seed!r}", param="seed"
        )
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(sp, name), bool):
            raise RequestInvalid(f"{name} must be true or false", param=name)
    if not isinstance(sp.stop, list) or not all(isinstance(s, str) for s in sp.stop):
        raise RequestInvalid("stop must be a list of strings", param="stop")
    if not isinstance(sp.stop_token_ids, list) or not all(
        _is_int(t) and 0 <= t < vocab_size for t in sp.stop_token_ids
    ):
        raise RequestInvalid(
            f"stop_token_ids must be token ids in [0, {vocab_size})", param="stop_token_ids"
        )
    check_logit_bias(sp.logit_bias, vocab_size)


def check_logit_bias(logit_bias: Any, vocab_size: int) -> None:
    """OpenAI's logit_bias: token id -> bias in [-100, 100], every id inside the vocabulary."""
    if logit_bias is None:
        return
    if not isinstance(logit_bias, dict):
        raise RequestInvalid("logit_bias must map token ids to biases", param="logit_bias")
    for token, bias in logit_bias.items():
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise RequestInvalid(
                f"logit_bias key {token!r} is not a token id in [0, {vocab_size})",
                param="logit_bias",
            )
        if not _is_number(bias) or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            raise RequestInvalid(
                f"logit_bias of token {token} must be in [-{LOGIT_BIAS_LIMIT:g}, "
                f"{LOGIT_BIAS_LIMIT:g}], got {bias!r}",
                param="logit_bias",
            )


def resolve_max_tokens(n_prompt: int, sp: SamplingParams, max_model_len: int) -> int:
    """The completion budget of a prompt of `n_prompt` tokens (the asked max_tokens, else what
    the context leaves); refused, worded like vLLM, when prompt and completion do not fit.
    Also where min_tokens meets the budget, since only here is the budget known."""
    asked = sp.max_tokens
    if n_prompt >= max_model_len or (asked is not None and n_prompt + asked > max_model_len):
        completion = asked or 0
        raise RequestInvalid(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {n_prompt + completion} tokens ({n_prompt} in the messages, "
            f"{completion} in the completion). Please reduce the length of the messages or "
            "completion.",
            param="messages",
        )
    budget = asked if asked is not None else max_model_len - n_prompt
    if sp.min_tokens > budget:
        what = "max_tokens" if asked is not None else "the tokens the context leaves"
        raise RequestInvalid(
            f"min_tokens ({sp.min_tokens}) must not exceed {what} ({budget})", param="min_tokens"
        )
    return budget
