"""OpenAI request bodies as Tessera's wire records.

Request path: schemas -> `chat_request`/`completion_request` -> GenerateRequest for the engine
(refusing only what Tessera does not implement; the engine checks values, actors/admission.py);
also error bodies, model names and /tokenize. The back path (outputs -> response and SSE chunk
dicts) is protocols/openai/bodies.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, cast

from protocols.messages import (
    DetokenizeRequest,
    ErrorInfo,
    GenerateRequest,
    SamplingParams,
    TokenizeReply,
    TokenizeRequest,
)
from protocols.openai.errors import OpenAIError
from protocols.openai.forced_tools import forced_format
from protocols.openai.schemas import (
    INT64_MAX,
    INT64_MIN,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeBody,
    SamplingFields,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from protocols.openai.structured import GUIDED_KEYS, structured_output

_TOKEN_ID = re.compile(r"-?[0-9]+")  # negative ones are refused by the engine, naming the id


def error_body(info: ErrorInfo) -> dict[str, Any]:
    return {
        "error": {
            "message": info.message,
            "type": info.type,
            "param": info.param,
            "code": info.code,
        }
    }


def resolve_model(requested: str | None, served: list[str]) -> str:
    """The served name a request addresses; None means the first one (as vLLM does)."""
    if requested is None:
        return served[0]
    if requested not in served:
        raise OpenAIError(
            f"The model `{requested}` does not exist.",
            type="NotFoundError",
            param="model",
            code=404,
        )
    return requested


# ---------------------------------------------------------------- requests


def _logit_bias(raw: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias keys are token ids written as strings; the engine checks the ranges."""
    if raw is None:
        return None
    bias: dict[int, float] = {}
    for key, value in raw.items():
        # digits only (no int() leniency: spaces, "_", "+"), and short enough for 64 bits
        if not (_TOKEN_ID.fullmatch(key) and len(key) <= 20 and INT64_MIN <= int(key) <= INT64_MAX):
            raise OpenAIError(
                "logit_bias keys must be token ids (integers written as strings), got "
                f"{key[:32]!r}",
                param="logit_bias",
            )
        bias[int(key)] = value
    return bias


def _sampling(
    req: SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    defaults: Mapping[str, Any],
) -> SamplingParams:
    """The OpenAI sampling fields as SamplingParams; their values are checked by the engine. A
    field the request leaves unset takes `defaults` (generation_config.json), else vLLM's."""
    choices_per_prompt(req)  # refuses a bad n before anything else
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    d = SamplingParams()

    def pick(name: str) -> Any:
        value = getattr(req, name)
        return value if value is not None else defaults.get(name, getattr(d, name))

    return SamplingParams(
        max_tokens=max_tokens,
        temperature=pick("temperature"),
        top_p=pick("top_p"),
        top_k=pick("top_k"),
        min_p=pick("min_p"),
        seed=req.seed,
        min_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        stop=[s for s in stop if s],
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=pick("repetition_penalty"),
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        logit_bias=_logit_bias(req.logit_bias),
        structured=structured_output(
            req.response_format,
            req.structured_outputs,
            {name: getattr(req, name) for name in GUIDED_KEYS},
        ),
    )


def choices_per_prompt(req: SamplingFields) -> int:
    """OpenAI's `n`: how many choices each prompt gets (its upper cap, --max-n, is checked
    before conversion: protocols/limits.py)."""
    n = 1 if req.n is None else req.n
    if n < 1:
        raise OpenAIError(f"n must be at least 1, got {n}", param="n")
    return n


def fan_out(base: list[GenerateRequest], n: int, request_id: str) -> list[GenerateRequest]:
    """Each request n times: choice k = i * n + j is copy j of request i, with id
    `{request_id}-{k}` when there is more than one choice. The copies share the prompt's KV
    blocks through the prefix cache. A seeded request's copy j draws with seed + j, so seeded
    choices differ from each other (as vLLM's do) and repeat run after run."""
    total = len(base) * n
    out = []
    for i, gen in enumerate(base):
        for j in range(n):
            k = i * n + j
            sampling = replace(gen.sampling)
            if sampling.seed is not None and j:  # wrapped into signed 64 bits
                sampling.seed = (sampling.seed + j + 2**63) % 2**64 - 2**63
            rid = request_id if total == 1 else f"{request_id}-{k}"
            out.append(replace(gen, request_id=rid, sampling=sampling))
    return out


def chat_requests(
    req: ChatCompletionRequest, request_id: str, defaults: Mapping[str, Any] | None = None
) -> list[GenerateRequest]:
    """The n choices of a chat request, as requests of their own (see fan_out)."""
    return fan_out([chat_request(req, request_id, defaults)], choices_per_prompt(req), request_id)


def _has_image(messages: list[dict[str, Any]]) -> bool:
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(
            isinstance(part, dict) and part.get("type") in ("image_url", "image")
            for part in content
        ):
            return True
    return False


def chat_request(
    req: ChatCompletionRequest, request_id: str, defaults: Mapping[str, Any] | None = None
) -> GenerateRequest:
    if req.echo:
        raise OpenAIError(
            "echo is not supported on chat completions; use /v1/completions with the rendered "
            "prompt (echo there returns the prompt's text and, with logprobs, its tokens)",
            param="echo",
        )
    if req.tessera is not None and req.tessera.boxes and not _has_image(req.messages):
        raise OpenAIError(
            "tessera.boxes maps boxes to the request's images; this request has none",
            param="tessera.boxes",
        )
    if req.top_logprobs and not req.logprobs:
        raise OpenAIError(
            "when using `top_logprobs`, `logprobs` must be set to true", param="top_logprobs"
        )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens
    if max_tokens is None:
        max_tokens = req.max_tokens
    sampling = _sampling(req, max_tokens, logprobs, defaults or {})
    forced = forced_format(req.tool_choice, req.tools, req.parallel_tool_calls is not False)
    if forced is not None:
        if sampling.structured is not None:
            raise OpenAIError(
                "tool_choice required or named holds the answer to tool calls; it cannot be "
                "combined with response_format or structured_outputs",
                param="tool_choice",
            )
        sampling.structured = forced[1]
    return GenerateRequest(
        request_id=request_id,
        sampling=sampling,
        messages=req.messages,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        chat_template_kwargs=dict(req.chat_template_kwargs or {}),
        mm_processor_kwargs=dict(req.mm_processor_kwargs or {}),
        tools=req.tools,
        chat_template=req.chat_template,
        arrival_time=time.time(),
    )


def tool_parser_for(
    req: ChatCompletionRequest, enable_auto_tool_choice: bool, tool_call_parser: str | None
) -> str | None:
    """The tool-call parser this request's answer goes through; None: the answer is content.
    vLLM's rules: `tool_choice` defaults to "auto" with tools and "none" without; "none" still
    shows the tools to the model; "auto" needs the server's --enable-auto-tool-choice and
    --tool-call-parser. "required" and a named tool hold the answer to calls with structured
    outputs (protocols/openai/forced_tools.py), whatever the server's parser."""
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if req.tools else "none"
    if choice == "none":
        return None
    if req.tools is None:
        raise OpenAIError("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    if choice == "required" and not req.tools:
        return None  # as OpenAI and vLLM: "required" with no tools is "none"
    if choice == "auto":
        if not (enable_auto_tool_choice and tool_call_parser):
            raise OpenAIError(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set",
                param="tool_choice",
            )
        return tool_call_parser if req.tools else None
    forced = forced_format(choice, req.tools)
    if forced is not None:  # the answer is held to calls (chat_request) and read as calls
        return forced[0]
    raise OpenAIError(
        f'Invalid value for `tool_choice`: {choice!r}! Only named tools, "none", "auto" or '
        '"required" are supported.',
        param="tool_choice",
    )


def completion_requests(
    req: CompletionRequest, request_id: str, defaults: Mapping[str, Any] | None = None
) -> list[GenerateRequest]:
    """n GenerateRequests per prompt: a text, token ids, or a list of either (a batch); prompt
    i's copy j is choice i * n + j (see fan_out)."""
    if req.suffix:
        raise OpenAIError("suffix is not supported", param="suffix")
    if req.best_of not in (None, 1):
        raise OpenAIError("best_of must be 1", param="best_of")
    prompts: list[str | list[int]]
    if isinstance(req.prompt, list) and req.prompt and isinstance(req.prompt[0], (str, list)):
        prompts = cast("list[str | list[int]]", list(req.prompt))
    else:
        prompts = [cast("str | list[int]", req.prompt)]
    sampling = _sampling(req, req.max_tokens, req.logprobs, defaults or {})
    sampling.prompt_logprobs = prompt_top_k(req)
    now = time.time()
    batch = []
    for prompt in prompts:
        if isinstance(prompt, str):
            gen = GenerateRequest(request_id, replace(sampling), prompt=prompt, arrival_time=now)
        else:
            ids = [int(t) for t in prompt]
            gen = GenerateRequest(
                request_id, replace(sampling), prompt_token_ids=ids, arrival_time=now
            )
        batch.append(gen)
    return fan_out(batch, choices_per_prompt(req), request_id)


def prompt_top_k(req: CompletionRequest) -> int | None:
    """How many alternatives the engine computes at each prompt token: vLLM's
    `prompt_logprobs`, and `logprobs` when `echo` lists the prompt's tokens; None: none."""
    asked = [req.prompt_logprobs]
    if req.echo:
        asked.append(req.logprobs)
    ks = [k for k in asked if k is not None]
    return max(ks) if ks else None


def tokenize_request(
    req: TokenizeCompletionRequest | TokenizeChatRequest, request_id: str
) -> TokenizeRequest:
    """vLLM's /tokenize body as the tokenizer stage's record."""
    if isinstance(req, TokenizeCompletionRequest):
        return TokenizeRequest(
            request_id,
            prompt=req.prompt,
            add_special_tokens=req.add_special_tokens,
            return_token_strs=req.return_token_strs,
        )
    return TokenizeRequest(
        request_id,
        messages=req.messages,
        add_special_tokens=req.add_special_tokens,
        add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message,
        chat_template_kwargs=dict(req.chat_template_kwargs or {}),
        tools=req.tools,
        chat_template=req.chat_template,
        return_token_strs=req.return_token_strs,
    )


def detokenize_request(req: DetokenizeBody, request_id: str) -> DetokenizeRequest:
    return DetokenizeRequest(request_id, token_ids=list(req.tokens))


def tokenize_response(reply: TokenizeReply) -> dict[str, Any]:
    """vLLM's TokenizeResponse: count, max_model_len, tokens, token_strs (null unless asked)."""
    return {
        "count": len(reply.token_ids),
        "max_model_len": reply.max_model_len,
        "tokens": reply.token_ids,
        "token_strs": reply.token_strs,
    }
