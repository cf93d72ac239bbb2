"""Tokenizer stage: chat template and tokenization, and admission of every request it sees.

gateway -> here -> (image stage when the request has images) -> scheduler. A request that cannot
run is refused here with a 400 and goes no further; aborts follow the request's path on.
/tokenize and /detokenize are answered here too (gateway -> here -> gateway), with the very
tokenizer and chat template generation uses.
"""

from __future__ import annotations

import time
from typing import Any

from actors import admission, metrics
from actors.admission import RequestInvalid
from core.launch.addresses import owner
from models.chat_messages import template_messages
from models.chat_template import compile_chat_template
from models.detokenizer import PROMPT_CONTEXT
from models.grammar import check as check_structured
from models.grammar import grammar_tokenizer
from models.tokenizer import TextTokenizer
from protocols.messages import (
    AbortRequest,
    DetokenizeRequest,
    EngineRequest,
    ErrorInfo,
    GenerateRequest,
    PendingImages,
    RequestError,
    StreamOpen,
    TokenizeReply,
    TokenizeRequest,
)
from protocols.stage import Stage


class TokenizerActor(Stage):
    async def setup(self) -> dict[str, Any]:
        self.tokenizer = TextTokenizer.load(self.config.tokenizer_path)
        if self.config.chat_template is not None:  # --chat-template replaces the checkpoint's
            compile_chat_template(self.config.chat_template)  # a broken one fails the start
            self.tokenizer.chat_template = self.config.chat_template
        self.eos_ids = sorted(set(self.tokenizer.eos_token_ids) | set(self.facts.eos_token_ids))
        a = self.addresses
        self.inbox = self.transport.mailbox(a.tokenizers[self.index])
        self.to_images = [self.transport.outbox(address) for address in a.images]
        self.to_detokenizers = [self.transport.outbox(address) for address in a.detokenizers]
        self.to_scheduler = self.transport.outbox(a.scheduler)
        self.to_gateway = self.transport.outbox(a.gateway)
        return {}

    async def run(self) -> None:
        await self.serve(
            self.inbox,
            {
                GenerateRequest: self.on_request,
                AbortRequest: self.on_abort,
                TokenizeRequest: self.on_tokenize,
                DetokenizeRequest: self.on_tokenize,
            },
        )

    async def on_request(self, req: GenerateRequest) -> None:
        rid = req.request_id
        t0 = time.perf_counter()
        try:
            admitted = self.admit(req)
        except RequestInvalid as exc:
            await self.to_gateway.send(RequestError(rid, exc.error))
            return
        except Exception as exc:  # a bug must cost one request, never the stage
            self.log.exception("tokenizer error", request_id=rid)
            await self.to_gateway.send(RequestError(rid, internal_error(exc)))
            return
        metrics.stage_latency.labels("tokenizer").observe(time.perf_counter() - t0)
        self.log.debug("tokenized", request_id=rid, prompt_tokens=len(admitted.prompt_token_ids))
        if isinstance(admitted, PendingImages):
            await self.to_images[owner(rid, len(self.to_images))].send(admitted)
            return
        tail = admitted.prompt_token_ids[-PROMPT_CONTEXT:]
        opened = StreamOpen(rid, admitted.sampling, prompt_tail_ids=tail)
        await self.to_detokenizers[owner(rid, len(self.to_detokenizers))].send(opened)
        await self.to_scheduler.send(admitted)

    async def on_abort(self, msg: AbortRequest) -> None:
        """Forward to the image stage that may hold the request and to the scheduler: whichever
        knows it acts, the other ignores it (the image stage's copy reaches the scheduler after
        the request itself, on the same socket)."""
        if self.to_images:
            await self.to_images[owner(msg.request_id, len(self.to_images))].send(msg)
        await self.to_scheduler.send(msg)

    async def on_tokenize(self, req: TokenizeRequest | DetokenizeRequest) -> None:
        """Answer /tokenize or /detokenize; a refusal travels back in the reply."""
        rid = req.request_id
        try:
            if isinstance(req, TokenizeRequest):
                reply = self.tokenize(req)
            else:
                reply = self.detokenize(req)
        except RequestInvalid as exc:
            reply = TokenizeReply(rid, error=exc.error)
        except Exception as exc:  # a bug must cost one request, never the stage
            self.log.exception("tokenize error", request_id=rid)
            reply = TokenizeReply(rid, error=internal_error(exc))
        await self.to_gateway.send(reply)

    def tokenize(self, req: TokenizeRequest) -> TokenizeReply:
        """The ids generation would run for this prompt or these messages (text only)."""
        if (req.prompt is None) == (req.messages is None):
            raise RequestInvalid("give exactly one of prompt or messages")
        if req.messages is not None:
            ids, sources = self._render_chat(
                req.messages,
                req.add_generation_prompt,
                req.continue_final_message,
                req.chat_template_kwargs,
                req.tools,
                req.chat_template,
                add_special_tokens=bool(req.add_special_tokens),
            )
            if sources:
                raise RequestInvalid(
                    "tokenizing messages with images is not supported yet: each image's "
                    "placeholder count depends on the image stage",
                    param="messages",
                )
        elif isinstance(req.prompt, str):
            add_special = req.add_special_tokens is not False
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=add_special)
        else:
            raise RequestInvalid("prompt must be a string", param="prompt")
        strs = None
        if req.return_token_strs:
            strs = [self.tokenizer.id_to_token(i) or "" for i in ids]
        return TokenizeReply(req.request_id, ids, strs, max_model_len=self.facts.max_model_len)

    def detokenize(self, req: DetokenizeRequest) -> TokenizeReply:
        ids = req.token_ids
        if not isinstance(ids, list):
            raise RequestInvalid("tokens must be a list of token ids", param="tokens")
        if ids:
            admission.check_prompt_ids(ids, self.facts.vocab_size, "tokens")
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return TokenizeReply(req.request_id, text=text, max_model_len=self.facts.max_model_len)

    def admit(self, req: GenerateRequest) -> EngineRequest | PendingImages:
        """The request as the next stage takes it, or RequestInvalid."""
        param = admission.check_prompt_form(req)
        sp = req.sampling
        admission.check_sampling(sp, self.facts.vocab_size, self.config.max_logprobs)
        if sp.structured is not None:
            vocab = grammar_tokenizer(self.config.tokenizer_path, tuple(self.eos_ids))
            error = check_structured(sp.structured.kind, sp.structured.spec, vocab)
            if error is not None:
                raise RequestInvalid(
                    f"the structured output format cannot be enforced: {error}",
                    param="response_format",
                )
        sources: list[str] = []
        if req.messages is not None:
            ids, sources = self._render_chat(
                req.messages,
                req.add_generation_prompt,
                req.continue_final_message,
                req.chat_template_kwargs,
                req.tools,
                req.chat_template,
            )
        elif req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=True)
        else:
            ids = list(req.prompt_token_ids or [])
        admission.check_prompt_ids(ids, self.facts.vocab_size, param)
        if sources:
            # The prompt grows when the image stage expands the placeholders: it resolves max_tokens.
            return PendingImages(
                request_id=req.request_id,
                prompt_token_ids=ids,
                sampling=sp,
                image_sources=sources,
                eos_token_ids=self.eos_ids,
                mm_processor_kwargs=admission.mm_processor_kwargs(req.mm_processor_kwargs),
                arrival_time=req.arrival_time,
            )
        return EngineRequest(
            request_id=req.request_id,
            prompt_token_ids=ids,
            sampling=sp,
            max_tokens=admission.resolve_max_tokens(len(ids), sp, self.facts.max_model_len),
            eos_token_ids=self.eos_ids,
            arrival_time=req.arrival_time,
        )

    def _render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        continue_final_message: bool,
        template_kwargs: dict[str, Any],
        tools: list[dict[str, Any]] | None,
        chat_template: str | None,
        add_special_tokens: bool = False,
    ) -> tuple[list[int], list[str]]:
        """Chat template (with the request's tool definitions) -> token ids, and the image
        sources in prompt order. Special tokens the request writes are text, not control tokens."""
        accepts_images = self.facts.accepts_images
        sources = admission.parse_messages(messages, accepts_images)
        admission.check_image_count(len(sources), self.config.limit_mm_per_prompt)
        admission.check_generation_prompt(add_generation_prompt, continue_final_message)
        admission.check_template_kwargs(template_kwargs)
        admission.check_tools(tools)
        template = admission.request_chat_template(
            chat_template, template_kwargs, self.config.trust_request_chat_template
        )
        template_kwargs = {k: v for k, v in template_kwargs.items() if k != "chat_template"}
        if tools is not None:  # the request's tools win over a "tools" in chat_template_kwargs
            template_kwargs = {**template_kwargs, "tools": tools or None}
        try:
            ids = self.tokenizer.encode_chat(
                template_messages(messages, text_only=not accepts_images),
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                template_kwargs=template_kwargs,
                add_special_tokens=add_special_tokens,
                chat_template=template,
            )
        except ValueError as exc:
            raise RequestInvalid(
                f"cannot apply the chat template: {exc}", param="messages"
            ) from exc
        if sources:
            assert self.facts.image_token_id is not None  # parse_messages refused images otherwise
            admission.check_image_placeholders(ids, self.facts.image_token_id, len(sources))
        return ids, sources


def internal_error(exc: Exception) -> ErrorInfo:
    """What the client learns of a bug in this stage: its kind, not its text (which may quote
    internals); the traceback is in the server log."""
    return ErrorInfo(
        f"internal error in the tokenizer stage ({type(exc).__name__}); see the server log",
        type="InternalServerError",
        code=500,
    )
