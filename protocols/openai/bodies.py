"""Tessera's outputs as OpenAI bodies: RequestOutput increments -> logprobs, usage, whole
chat/completion responses and SSE chunk dicts. The HTTP stage's back path (app.py collects,
stream.py streams); protocols/openai/convert.py reads the requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocols.grounding import boxes_per_image
from protocols.messages import (
    PositionLogprobs,
    RequestOutput,
    TokenLogprob,
)
from protocols.openai.forced_tools import read_tool_calls

LOGPROB_FLOOR = -9999.0  # -inf is not JSON; vLLM clamps the same way


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
