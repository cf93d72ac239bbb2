"""Tokenizer stage: chat template, tokenization and every limit check, before any scheduling.

A request that cannot run (too long, malformed, unknown tokens) is refused here with a 400 and
never reaches the scheduler; the rest go on as `TokenizedRequest`.
"""

from __future__ import annotations

import time
from typing import Any

from actors import metrics
from core.actor import Actor
from models.tokenizer import TextTokenizer, flatten_text_content
from protocols.messages import ErrorInfo, GenerateRequest, RequestError, TokenizedRequest

MAX_TOP_LOGPROBS = 20


class RequestInvalid(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TokenizerActor(Actor):
    async def setup(self) -> dict[str, Any]:
        self.tokenizer = TextTokenizer.load(self.config.model)
        self.max_model_len = int(self.engine_info["max_model_len"])
        self.vocab_size = int(self.engine_info.get("vocab_size") or self.tokenizer.vocab_size)
        self.eos_ids = sorted(
            set(self.tokenizer.eos_token_ids) | set(self.engine_info.get("eos_token_ids", []))
        )
        self.inbox = self.transport.mailbox(self.addresses.tokenizer, bind=False)
        self.to_scheduler = self.transport.outbox(self.addresses.scheduler)
        self.to_gateway = self.transport.outbox(self.addresses.gateway)
        return {}

    async def run(self) -> None:
        await self.serve(self.inbox, {GenerateRequest: self.on_request})

    async def on_request(self, req: GenerateRequest) -> None:
        try:
            t0 = time.perf_counter()
            tokenized = self.tokenize(req)
            metrics.stage_latency.labels("tokenizer").observe(time.perf_counter() - t0)
            await self.to_scheduler.send(tokenized)
        except RequestInvalid as exc:
            err = ErrorInfo(str(exc), param=exc.param)
            await self.to_gateway.send(RequestError(req.request_id, err))
        except Exception as exc:  # a bug must cost one request, never the stage
            self.log.exception("tokenizer error", request_id=req.request_id)
            err = ErrorInfo(f"internal error: {exc}", type="InternalServerError", code=500)
            await self.to_gateway.send(RequestError(req.request_id, err))

    def tokenize(self, req: GenerateRequest) -> TokenizedRequest:
        given = [x is not None for x in (req.prompt, req.prompt_token_ids, req.messages)]
        if sum(given) != 1:
            raise RequestInvalid("give exactly one of prompt, prompt_token_ids or messages")
        if req.messages is not None:
            ids = self._render_chat(req)
        elif req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=True)
        else:
            ids = list(req.prompt_token_ids or [])
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise RequestInvalid(
                    f"token id {bad[0]!r} is out of vocabulary [0, {self.vocab_size})",
                    param="prompt",
                )
        if not ids:
            raise RequestInvalid("the prompt is empty", param="prompt")
        sp = req.sampling
        max_tokens = self._check_lengths(len(ids), sp.max_tokens)
        if sp.logprobs is not None and not 0 <= sp.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestInvalid(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
        if any(not 0 <= t < self.vocab_size for t in sp.stop_token_ids):
            raise RequestInvalid(
                "stop_token_ids holds an id outside the vocabulary", param="stop_token_ids"
            )
        if sp.min_tokens < 0 or sp.min_tokens > max_tokens:
            raise RequestInvalid(
                f"min_tokens must be in [0, max_tokens={max_tokens}]", param="min_tokens"
            )
        return TokenizedRequest(
            request_id=req.request_id,
            prompt_token_ids=ids,
            sampling=sp,
            max_tokens=max_tokens,
            eos_token_ids=self.eos_ids,
            arrival_time=req.arrival_time,
        )

    def _render_chat(self, req: GenerateRequest) -> list[int]:
        messages = req.messages or []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") not in ("text", None) for p in content
            ):
                raise RequestInvalid(
                    "this model accepts text only: remove the image parts", param="messages"
                )
        try:
            text = self.tokenizer.apply_chat_template(
                flatten_text_content(messages),
                add_generation_prompt=req.add_generation_prompt,
                **req.chat_template_kwargs,
            )
        except ValueError as exc:
            raise RequestInvalid(
                f"cannot apply the chat template: {exc}", param="messages"
            ) from exc
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_lengths(self, n_prompt: int, max_tokens: int | None) -> int:
        limit = self.max_model_len
        if max_tokens is not None and max_tokens < 1:
            raise RequestInvalid("max_tokens must be at least 1", param="max_tokens")
        if n_prompt >= limit or (max_tokens is not None and n_prompt + max_tokens > limit):
            asked = n_prompt + (max_tokens or 0)
            raise RequestInvalid(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{asked} tokens ({n_prompt} in the messages, {max_tokens or 0} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
            )
        return max_tokens if max_tokens is not None else limit - n_prompt
