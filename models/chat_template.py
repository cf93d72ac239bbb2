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


def render_chat_template(
    source: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **kwargs: Any,
) -> str:
    """Render `messages` with the template; template errors become ValueError."""
    template = compile_chat_template(source)
    context: dict[str, Any] = {"tools": None, "documents": None, **kwargs}
    try:
        return template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        )
    except Exception as exc:  # any failure inside a template is a bad request, not a crash
        raise ValueError(f"chat template failed: {exc}") from exc
