"""Conversion between OpenAI bodies and Tessera's wire records, both ways.

Request path: schemas -> `chat_request`/`completion_request` -> GenerateRequest for the engine
(refusing only what Tessera does not implement; the engine checks values, actors/admission.py);
back path: RequestOutput increments -> response dicts and SSE chunk dicts for the HTTP client.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

from protocols.grounding import boxes_per_image
from protocols.messages import (
    DetokenizeRequest,
    ErrorInfo,
    GenerateRequest,
    PositionLogprobs,
    RequestOutput,
    SamplingParams,
    TokenizeReply,
    TokenizeRequest,
    TokenLogprob,
)
from protocols.openai.errors import OpenAIError
from protocols.openai.forced_tools import forced_format, read_tool_calls
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

LOGPROB_FLOOR = -9999.0  # -inf is not JSON; vLLM clamps the same way
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


# ---------------------------------------------------------------- outputs


def _lp(value: float) -> float:
    return value if value > LOGPROB_FLOOR else LOGPROB_FLOOR


def _chat_token(t: TokenLogprob) -> dict[str, Any]:
    return {"token": t.token, "logprob": _lp(t.logprob), "bytes": list(t.token.encode())}


def chat_logprobs(positions: list[PositionLogprobs], top_k: int) -> dict[str, Any]:
    content = []
    for pos in positions:
        entry = _chat_token(pos.sampled)
        entry["top_logprobs"] = [_chat_token(t) for t in pos.top[:top_k]]
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    positions: list[PositionLogprobs], top_k: int, offset: int = 0
) -> dict[str, Any]:
    """OpenAI's legacy shape; `offset` is where this piece starts in the generated text."""
    tokens, token_logprobs, top, text_offset = [], [], [], []
    for pos in positions:
        tokens.append(pos.sampled.token)
        token_logprobs.append(_lp(pos.sampled.logprob))
        alternatives = {t.token: _lp(t.logprob) for t in pos.top[:top_k]}
        alternatives.setdefault(pos.sampled.token, _lp(pos.sampled.logprob))
        top.append(alternatives)
        text_offset.append(offset)
        offset += len(pos.sampled.token)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": text_offset,
    }


def echo_logprobs(
    strs: list[str], prompt: list[PositionLogprobs | None], top_k: int
) -> dict[str, Any]:
    """The prompt's part of an echoed completion's logprobs: every prompt token, the first
    one's logprob and alternatives null (nothing predicts it), offsets from 0."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    offset = 0
    for token, pos in zip(strs, prompt, strict=True):
        tokens.append(token)
        text_offset.append(offset)
        offset += len(token)
        if pos is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(_lp(pos.sampled.logprob))
        alternatives = {t.token: _lp(t.logprob) for t in pos.top[:top_k]}
        alternatives.setdefault(pos.sampled.token, _lp(pos.sampled.logprob))
        top.append(alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top,
        "text_offset": text_offset,
    }


def joined_logprobs(head: dict[str, Any] | None, tail: dict[str, Any] | None) -> dict[str, Any]:
    """Two legacy logprobs objects as one (the echoed prompt's, then the answer's)."""
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    return {k: (head or {}).get(k, []) + (tail or {}).get(k, []) for k in keys}


def vllm_prompt_logprobs(
    prompt: list[PositionLogprobs | None], top_k: int
) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs` choice field: per prompt token null (the first) or
    {token id: {logprob, rank, decoded_token}} for the token itself and the top `top_k`."""
    out: list[dict[str, Any] | None] = []
    for pos in prompt:
        if pos is None:
            out.append(None)
            continue
        entry = {}
        for t in [pos.sampled, *pos.top[:top_k]]:
            entry[str(t.token_id)] = {
                "logprob": _lp(t.logprob),
                "rank": t.rank,
                "decoded_token": t.token,
            }
        out.append(entry)
    return out


@dataclass
class Echo:
    """What an echoed completion choice puts before its answer: the prompt's text, its
    tokens' logprobs when `logprobs` is set (top_k), vLLM's `prompt_logprobs` when asked."""

    text: str | None  # None: no echo (only vLLM's prompt_logprobs field)
    top_k: int | None = None
    prompt_top_k: int | None = None

    def fields(self, out: RequestOutput | Collected) -> dict[str, Any]:
        """The choice's echoed logprobs head (key "head") and its prompt_logprobs field."""
        prompt = out.prompt_logprobs or []
        head = None
        if self.text is not None and self.top_k is not None:
            head = echo_logprobs(out.prompt_token_strs or [], prompt, self.top_k)
        result: dict[str, Any] = {"head": head}
        if self.prompt_top_k is not None:
            result["prompt_logprobs"] = vllm_prompt_logprobs(prompt, self.prompt_top_k)
        return result

    def apply(self, choice: dict[str, Any], out: RequestOutput | Collected) -> None:
        """Put the echoed prompt's logprobs (before the choice's own) and vLLM's
        prompt_logprobs field into a completion choice."""
        extra = self.fields(out)
        if extra["head"] is not None:
            choice["logprobs"] = joined_logprobs(extra["head"], choice["logprobs"])
        if "prompt_logprobs" in extra:
            choice["prompt_logprobs"] = extra["prompt_logprobs"]


def usage(out: RequestOutput, completion_tokens: int | None = None) -> dict[str, Any]:
    done = out.completion_tokens or (completion_tokens or 0)
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": done,
        "total_tokens": out.prompt_tokens + done,
        "prompt_tokens_details": {"cached_tokens": out.cached_tokens},
    }


def summed_usage(parts: list[dict[str, Any]], shared: int = 1) -> dict[str, Any]:
    """The usage of several choices together; every `shared` consecutive choices answer one
    prompt (OpenAI's n), which is counted once, as vLLM counts it."""
    firsts = parts[::shared]
    prompt = sum(p["prompt_tokens"] for p in firsts)
    completion = sum(p["completion_tokens"] for p in parts)
    cached = sum(p["prompt_tokens_details"]["cached_tokens"] for p in firsts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


@dataclass
class Collected:
    """A whole non-streamed generation, folded from its increments."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    final: RequestOutput | None = None
    mm_info: dict[str, Any] | None = None
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    prompt_token_strs: list[str] | None = None

    def add(self, out: RequestOutput) -> None:
        self.mm_info = self.mm_info or out.mm_info
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
            self.prompt_token_strs = out.prompt_token_strs
        self.text += out.text
        self.token_ids += out.token_ids
        self.logprobs += out.logprobs or []
        if out.finish_reason is not None:
            self.final = out


def chat_response(
    done: list[Collected],
    response_id: str,
    created: int,
    model: str,
    top_k: int | None,
    tool_parser: str | None = None,
    parallel_tool_calls: bool = True,
    boxes: bool = False,
) -> dict[str, Any]:
    """The chat.completion body, choice k from done[k] (the n choices share one prompt, counted
    once in the usage). With `tool_parser` the calls in an answer become `message.tool_calls`,
    `content` the text outside them (null if none), and the finish reason "tool_calls"."""
    choices = []
    for k, c in enumerate(done):
        assert c.final is not None
        message: dict[str, Any] = {"role": "assistant", "content": c.text}
        finish_reason = c.final.finish_reason
        if tool_parser is not None:
            parsed = read_tool_calls(tool_parser, c.text)
            if parsed.tool_calls:
                calls = parsed.tool_calls if parallel_tool_calls else parsed.tool_calls[:1]
                message["content"] = parsed.content
                message["tool_calls"] = [call.openai() for call in calls]
                finish_reason = "tool_calls"
        choices.append(
            {
                "index": k,
                "message": message,
                "logprobs": None if top_k is None else chat_logprobs(c.logprobs, top_k),
                "finish_reason": finish_reason,
                "stop_reason": c.final.stop_reason,
            }
        )
    usages = [usage(c.final, len(c.token_ids)) for c in done if c.final is not None]
    mm_info = dict(done[0].mm_info or {})
    if boxes:  # choice 0's boxes, mapped to every image of the request
        mm_info["boxes"] = boxes_per_image(done[0].text, mm_info.get("images", []))
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": summed_usage(usages, shared=len(done)),
        **({"tessera": mm_info} if mm_info else {}),
    }


def completion_response(
    done: list[Collected],
    response_id: str,
    created: int,
    model: str,
    top_k: int | None,
    n: int = 1,
    echoes: list[Echo] | None = None,
) -> dict[str, Any]:
    """Choice k from done[k] (n per prompt); usage summed, each prompt counted once. With
    echoes[k], the choice's prompt comes first (text and logprobs; see Echo)."""
    choices, usages = [], []
    for i, c in enumerate(done):
        assert c.final is not None
        echo = echoes[i] if echoes else None
        prefix = (echo.text or "") if echo else ""
        logprobs = None
        if top_k is not None:
            logprobs = completion_logprobs(c.logprobs, top_k, len(prefix))
        choice = {
            "index": i,
            "text": prefix + c.text,
            "logprobs": logprobs,
            "finish_reason": c.final.finish_reason,
            "stop_reason": c.final.stop_reason,
        }
        if echo is not None:
            echo.apply(choice, c)
        choices.append(choice)
        usages.append(usage(c.final, len(c.token_ids)))
    return {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": summed_usage(usages, shared=n),
    }


def chunk(
    response_id: str,
    obj: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    include_usage: bool,
    usage_value: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": response_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": choices,
    }
    if include_usage:
        body["usage"] = usage_value
    return body
