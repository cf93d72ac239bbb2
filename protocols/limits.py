"""Request size limits: the caps a request must fit before any costly work is done for it.

Checked twice on the request path, by the same functions: at the HTTP hop right after the body is
typed (protocols/openai/app.py), so an oversized request is refused before it reaches the engine,
and in the tokenizer stage (actors/tokenizer.py) before the chat template or the tokenizer runs,
so SDK clients meet the same caps. Every cap is a launch flag (core/cli.py); a refusal is a 400
naming the field. Pure functions: no sockets, no tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from core.config import EngineConfig

DEFAULT_MAX_IMAGES = 64  # images per request when --limit-mm-per-prompt names no image limit
IMAGE_PART_TYPES = ("image_url", "image")


class LimitExceeded(ValueError):
    """A request over one of the server's caps; `param` names the field, `code` the status."""

    def __init__(self, message: str, param: str | None, code: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class RequestLimits:
    """The caps of one server, read from its EngineConfig."""

    max_messages: int = 2048
    max_prompt_chars: int = 1_000_000
    max_n: int = 128
    max_stop_strings: int = 64
    max_stop_string_chars: int = 1024
    max_images: int = DEFAULT_MAX_IMAGES

    @classmethod
    def of(cls, config: EngineConfig) -> RequestLimits:
        return cls(
            max_messages=config.max_messages,
            max_prompt_chars=config.max_prompt_chars,
            max_n=config.max_n,
            max_stop_strings=config.max_stop_strings,
            max_stop_string_chars=config.max_stop_string_chars,
            max_images=image_limit(config.limit_mm_per_prompt),
        )


def image_limit(limit_mm_per_prompt: dict[str, int]) -> int:
    """Most images in one request: --limit-mm-per-prompt's, else DEFAULT_MAX_IMAGES."""
    return limit_mm_per_prompt.get("image", DEFAULT_MAX_IMAGES)


def _is_image_part(value: dict[Any, Any]) -> bool:
    return value.get("type") in IMAGE_PART_TYPES


def text_chars(value: Any) -> int:
    """Characters of every string in a JSON value (messages, tools), image parts left out: what
    the chat template will render into the prompt and the tokenizer encode."""
    total = 0
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, dict):
            if _is_image_part(item):
                continue
            todo.extend(k for k in item if isinstance(k, str))
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return total


def count_images(messages: Any) -> int:
    """Image content parts over all messages (malformed messages count none: admission says)."""
    if not isinstance(messages, list):
        return 0
    n = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            n += sum(1 for p in content if isinstance(p, dict) and _is_image_part(p))
    return n


def check_messages(messages: Any, tools: Any, limits: RequestLimits) -> None:
    """A chat: at most max_messages messages, max_images images and max_prompt_chars characters
    of text (messages and tool definitions together)."""
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise LimitExceeded(
            f"at most {limits.max_messages} messages may be sent in one request "
            f"(--max-messages); this request has {len(messages)}",
            param="messages",
        )
    images = count_images(messages)
    if images > limits.max_images:
        raise LimitExceeded(
            f"At most {limits.max_images} image(s) may be provided in one prompt "
            f"(--limit-mm-per-prompt); this request has {images}",
            param="messages",
        )
    check_prompt_chars(text_chars(messages) + text_chars(tools), limits, "messages")


def check_prompts(prompts: Iterable[Any], limits: RequestLimits) -> None:
    """Text prompts (token-id prompts have no characters): max_prompt_chars over them all."""
    check_prompt_chars(sum(len(p) for p in prompts if isinstance(p, str)), limits, "prompt")


def check_prompt_chars(chars: int, limits: RequestLimits, param: str) -> None:
    if chars > limits.max_prompt_chars:
        raise LimitExceeded(
            f"the prompt text is {chars} characters; at most {limits.max_prompt_chars} are "
            "accepted (--max-prompt-chars)",
            param=param,
        )


def check_n(n: int | None, limits: RequestLimits) -> int:
    """OpenAI's `n` (None: 1) within [1, max_n]; returns it."""
    value = 1 if n is None else n
    if not 1 <= value <= limits.max_n:
        raise LimitExceeded(
            f"n must be between 1 and {limits.max_n} (--max-n), got {value}", param="n"
        )
    return value


def check_stop(stop: Any, limits: RequestLimits) -> None:
    """At most max_stop_strings stop strings of at most max_stop_string_chars characters each."""
    strings = [stop] if isinstance(stop, str) else stop
    if not isinstance(strings, list):
        return  # not a list of strings: the type checks refuse it
    if len(strings) > limits.max_stop_strings:
        raise LimitExceeded(
            f"at most {limits.max_stop_strings} stop strings are accepted (--max-stop-strings); "
            f"this request has {len(strings)}",
            param="stop",
        )
    longest = max((len(s) for s in strings if isinstance(s, str)), default=0)
    if longest > limits.max_stop_string_chars:
        raise LimitExceeded(
            f"a stop string is {longest} characters; at most {limits.max_stop_string_chars} are "
            "accepted (--max-stop-string-chars)",
            param="stop",
        )


def check_max_tokens(max_tokens: int | None, max_model_len: int | None, param: str) -> None:
    """A completion budget the context could never hold is refused before tokenizing."""
    if max_tokens is None or max_model_len is None:
        return
    if max_tokens > max_model_len:
        raise LimitExceeded(
            f"{param} is {max_tokens}, more than this model's maximum context length "
            f"({max_model_len} tokens)",
            param=param,
        )
