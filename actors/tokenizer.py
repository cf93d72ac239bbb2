"""Tokenizer stage: chat template, tokenization and every limit check, before any scheduling.

A request that cannot run (too long, malformed, unknown tokens) is refused here with a 400 and
never reaches the scheduler; the rest go on as `TokenizedRequest`.
"""

from __future__ import annotations

import time
from typing import Any

from actors import metrics
from actors.limits import RequestInvalid, resolve_max_tokens
from core.actor import Actor
from models.tokenizer import TextTokenizer, flatten_text_content
from protocols.messages import ErrorInfo, GenerateRequest, RequestError, TokenizedRequest

MAX_TOP_LOGPROBS = 20


class TokenizerActor(Actor):
    async def setup(self) -> dict[str, Any]:
        self.tokenizer = TextTokenizer.load(self.config.model)
        self.max_model_len = int(self.engine_info["max_model_len"])
        self.vocab_size = int(self.engine_info.get("vocab_size") or self.tokenizer.vocab_size)
        self.eos_ids = sorted(
            set(self.tokenizer.eos_token_ids) | set(self.engine_info.get("eos_token_ids", []))
        )
        self.image_token_id = self.engine_info.get("image_token_id")
        self.inbox = self.transport.mailbox(self.addresses.tokenizer, bind=False)
        self.to_images = self.transport.outbox(self.addresses.images)
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
            next_stage = self.to_images if tokenized.image_sources else self.to_scheduler
            self.log.debug(
                "tokenized",
                request_id=req.request_id,
                prompt_tokens=len(tokenized.prompt_token_ids),
                images=len(tokenized.image_sources),
            )
            await next_stage.send(tokenized)
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
        sources: list[str] = []
        if req.messages is not None:
            ids, sources = self._render_chat(req)
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
        # With images the prompt grows when placeholders are expanded: the image stage checks.
        max_tokens = (
            sp.max_tokens
            if sources
            else resolve_max_tokens(len(ids), sp.max_tokens, self.max_model_len)
        )
        if sp.logprobs is not None and not 0 <= sp.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestInvalid(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", param="logprobs")
        if any(not 0 <= t < self.vocab_size for t in sp.stop_token_ids):
            raise RequestInvalid(
                "stop_token_ids holds an id outside the vocabulary", param="stop_token_ids"
            )
        if sp.min_tokens < 0 or (max_tokens is not None and sp.min_tokens > max_tokens):
            raise RequestInvalid(
                f"min_tokens must be in [0, max_tokens={max_tokens}]", param="min_tokens"
            )
        return TokenizedRequest(
            request_id=req.request_id,
            prompt_token_ids=ids,
            sampling=sp,
            max_tokens=max_tokens or 0,
            eos_token_ids=self.eos_ids,
            arrival_time=req.arrival_time,
            image_sources=sources,
            mm_processor_kwargs=req.mm_processor_kwargs,
        )

    def _render_chat(self, req: GenerateRequest) -> tuple[list[int], list[str]]:
        """Chat template -> token ids, and the image sources in prompt order."""
        messages = req.messages or []
        sources = image_sources(messages)
        if sources and self.image_token_id is None:
            raise RequestInvalid(
                "this model accepts text only: remove the image parts", param="messages"
            )
        try:
            if self.image_token_id is None:
                messages = flatten_text_content(messages)
            text = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=req.add_generation_prompt,
                **req.chat_template_kwargs,
            )
        except ValueError as exc:
            raise RequestInvalid(
                f"cannot apply the chat template: {exc}", param="messages"
            ) from exc
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if sources and ids.count(self.image_token_id) != len(sources):
            raise RequestInvalid(
                f"the chat template placed {ids.count(self.image_token_id)} image placeholders "
                f"for {len(sources)} images",
                param="messages",
            )
        return ids, sources


def image_sources(messages: list[dict[str, Any]]) -> list[str]:
    """The image URLs of OpenAI content parts, in order (`image_url` parts, or `image`)."""
    out: list[str] = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                raise RequestInvalid("a content part must be an object", param="messages")
            kind = part.get("type")
            if kind == "image_url" or (kind is None and "image_url" in part):
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
            elif kind == "image":
                url = part.get("image")
            elif kind in ("text", None):
                continue
            else:
                raise RequestInvalid(f"unsupported content part type {kind!r}", param="messages")
            if not isinstance(url, str) or not url:
                raise RequestInvalid("an image part needs a url string", param="messages")
            out.append(url)
    return out
