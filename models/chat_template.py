"""Chat template rendering: a checkpoint's jinja chat template, run in a sandbox.
The tokenizer stage calls this to turn OpenAI-style messages into prompt text before tokenizing."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates expect plain json.dumps output.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a template once; later calls with the same source reuse it."""
    try:
        return _environment().from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ValueError(f"chat template does not compile: {exc}") from exc


# Appended to the final message's text when it is to be continued; the rendered chat is cut where
# it lands. The trailing space shows whether the template trimmed the text.
CONTINUE_MARK = "TESSERA_CONTINUE_FINAL_MESSAGE "


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    /,
    **kwargs: Any,
) -> str:
    """Render `messages` with the template; template errors become ValueError. `kwargs` are the
    template's other variables (any names: the parameters are positional only).

    With `continue_final_message` the text ends right after the final message's text (whatever
    the template puts after it dropped), so the model continues that message, as transformers
    and vLLM do; the caller leaves `add_generation_prompt` off."""
    template = compile_chat_template(source)
    context: dict[str, Any] = {"tools": None, "documents": None, **kwargs}
    if continue_final_message:
        messages = _mark_final_text(messages)
    try:
        text = template.render(
            {**context, "messages": messages, "add_generation_prompt": add_generation_prompt}
        )
    except Exception as exc:  # any failure inside a template is a bad request, not a crash
        raise ValueError(f"chat template failed: {exc}") from exc
    if not continue_final_message:
        return text
    at = text.rfind(CONTINUE_MARK.rstrip())
    if at < 0:
        raise ValueError(
            "continue_final_message: the chat template does not render the final message's text, "
            "so it cannot be continued"
        )
    if text.startswith(CONTINUE_MARK, at):
        return text[:at]
    return text[:at].rstrip()  # the template trimmed the text: its trailing spaces are gone too


def _mark_final_text(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of `messages` whose final message's text (its last text part) ends with the mark."""
    if not messages:
        raise ValueError("continue_final_message needs a final message to continue")
    final = dict(messages[-1])
    content = final.get("content")
    if isinstance(content, str):
        final["content"] = content + CONTINUE_MARK
    elif isinstance(content, list):
        parts = list(content)
        texts = [i for i, p in enumerate(parts) if isinstance(p, dict) and "text" in p]
        if not texts:
            raise ValueError("continue_final_message: the final message has no text to continue")
        last = texts[-1]
        parts[last] = {**parts[last], "text": str(parts[last]["text"]) + CONTINUE_MARK}
        final["content"] = parts
    else:
        raise ValueError("continue_final_message: the final message has no text to continue")
    return [*messages[:-1], final]
