"""Request limits shared by the stages that can refuse a request before it is scheduled
(tokenizer for text, image preprocessor once image placeholders are expanded)."""

from __future__ import annotations


class RequestInvalid(ValueError):
    """A request refused with a 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def resolve_max_tokens(n_prompt: int, max_tokens: int | None, max_model_len: int) -> int:
    """The completion budget, or RequestInvalid worded like vLLM's context-length error."""
    if max_tokens is not None and max_tokens < 1:
        raise RequestInvalid("max_tokens must be at least 1", param="max_tokens")
    if n_prompt >= max_model_len or (
        max_tokens is not None and n_prompt + max_tokens > max_model_len
    ):
        asked = n_prompt + (max_tokens or 0)
        raise RequestInvalid(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {asked} tokens ({n_prompt} in the messages, {max_tokens or 0} in the "
            "completion). Please reduce the length of the messages or completion.",
            param="messages",
        )
    return max_tokens if max_tokens is not None else max_model_len - n_prompt
