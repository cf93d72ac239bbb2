"""The server's request caps applied to typed OpenAI bodies, before conversion.

HTTP hop, between schemas and convert (protocols/openai/app.py): messages, images, prompt
characters, n, stop strings and a max_tokens the context could never hold are refused here, in
the HTTP process, before the request reaches the tokenizer stage. The rules themselves are
protocols/limits.py's, which the tokenizer stage applies again for SDK clients.
"""

from __future__ import annotations

from collections.abc import Callable

from protocols.limits import (
    LimitExceeded,
    RequestLimits,
    check_max_tokens,
    check_messages,
    check_n,
    check_prompt_chars,
    check_prompts,
    check_stop,
)
from protocols.openai.errors import OpenAIError
from protocols.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)


def _as_openai_error(check: Callable[[], None]) -> None:
    try:
        check()
    except LimitExceeded as exc:
        raise OpenAIError(str(exc), param=exc.param, code=exc.code) from None


def check_chat(
    body: ChatCompletionRequest, limits: RequestLimits, max_model_len: int | None
) -> None:
    """A chat (or Responses) request within the caps; OpenAIError naming the field if not."""

    def check() -> None:
        check_n(body.n, limits)
        check_stop(body.stop, limits)
        if body.max_completion_tokens is not None:
            check_max_tokens(body.max_completion_tokens, max_model_len, "max_completion_tokens")
        else:
            check_max_tokens(body.max_tokens, max_model_len, "max_tokens")
        check_messages(body.messages, body.tools, limits)

    _as_openai_error(check)


def check_completion(
    body: CompletionRequest, limits: RequestLimits, max_model_len: int | None
) -> None:
    """A text completion within the caps (every prompt of a batch counted together)."""

    def check() -> None:
        check_n(body.n, limits)
        check_stop(body.stop, limits)
        check_max_tokens(body.max_tokens, max_model_len, "max_tokens")
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        check_prompts(prompts, limits)

    _as_openai_error(check)


def check_tokenize(
    body: TokenizeCompletionRequest | TokenizeChatRequest, limits: RequestLimits
) -> None:
    """/tokenize: the same text caps as generation."""

    def check() -> None:
        if isinstance(body, TokenizeChatRequest):
            check_messages(body.messages, body.tools, limits)
        else:
            check_prompt_chars(len(body.prompt), limits, "prompt")

    _as_openai_error(check)
