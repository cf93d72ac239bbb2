"""Tokenizer stage: chat template and tokenization, and admission of every request it sees.

gateway -> here -> (image stage when the request has images) -> scheduler. A request that cannot
run is refused here with a 400 and goes no further; aborts follow the request's path on.
/tokenize and /detokenize are answered here too (gateway -> here -> gateway), with the very
tokenizer and chat template generation uses.

A request with a long text (OFFLOAD_CHARS and more, up to --max-prompt-chars) is rendered and
tokenized on a worker thread, one at a time, with a tokenizer of its own (the long encodes
release the GIL), so the short requests behind it are admitted meanwhile; an abort that arrives
while it is there ends it there.
"""

from __future__ import annotations

import time
from typing import Any

import anyio

from actors import admission, metrics
from actors.admission import RequestInvalid
from core.launch.addresses import owner
from models.chat_messages import template_messages
from models.chat_template import compile_chat_template
from models.detokenizer import PROMPT_CONTEXT
from models.grammar import check as check_structured
from models.grammar import grammar_tokenizer
from models.tokenizer import TextTokenizer
from protocols.limits import RequestLimits, text_chars
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

OFFLOAD_CHARS = 16_384  # requests with this much text are tokenized on the worker thread
Admitted = EngineRequest | PendingImages | RequestError


def request_chars(req: GenerateRequest | TokenizeRequest) -> int:
    """The text a request makes the stage render and encode (what decides where it runs)."""
    if isinstance(req.prompt, str):
        return len(req.prompt)
    return text_chars(req.messages) + text_chars(req.tools)


class TokenizerActor(Stage):
    async def setup(self) -> dict[str, Any]:
        self.tokenizer = self._load_tokenizer()
        self.worker_tokenizer = self._load_tokenizer()  # the worker thread's own: no shared state
        self.worker = anyio.CapacityLimiter(1)
        self.offloaded: dict[str, bool] = {}  # request id on the worker -> aborted meanwhile
        self.limits = RequestLimits.of(self.config)
        self.eos_ids = sorted(set(self.tokenizer.eos_token_ids) | set(self.facts.eos_token_ids))
        a = self.addresses
        self.inbox = self.transport.mailbox(a.tokenizers[self.index])
        self.to_images = [self.transport.outbox(address) for address in a.images]
        self.to_detokenizers = [self.transport.outbox(address) for address in a.detokenizers]
        self.to_scheduler = self.transport.outbox(a.scheduler)
        self.to_gateway = self.transport.outbox(a.gateway)
        return {}

    def _load_tokenizer(self) -> TextTokenizer:
        tokenizer = TextTokenizer.load(self.config.tokenizer_path)
        if self.config.chat_template is not None:  # --chat-template replaces the checkpoint's
            compile_chat_template(self.config.chat_template)  # a broken one fails the start
            tokenizer.chat_template = self.config.chat_template
        return tokenizer

    async def run(self) -> None:
        async with anyio.create_task_group() as self.tasks:
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
        t0 = time.perf_counter()
        try:
            admission.check_size(req, self.limits)  # cheap: before any rendering or encoding
        except RequestInvalid as exc:
            await self.to_gateway.send(RequestError(req.request_id, exc.error))
            return
        if request_chars(req) < OFFLOAD_CHARS:
            await self._send_on(self._admitted(req, self.tokenizer), t0)
            return
        self.offloaded[req.request_id] = False
        self.tasks.start_soon(self._admit_on_worker, req, t0)

    async def _admit_on_worker(self, req: GenerateRequest, t0: float) -> None:
        """Admit a long request on the worker thread; drop it if its abort came meanwhile, and
        pass on an abort that came while it was being sent."""
        rid = req.request_id
        sent = False
        try:
            admitted = await anyio.to_thread.run_sync(
                self._admitted, req, self.worker_tokenizer, limiter=self.worker
            )
            if not self.offloaded[rid]:
                await self._send_on(admitted, t0)
                sent = True
        finally:
            aborted = self.offloaded.pop(rid, False)
        if sent and aborted:
            await self._pass_abort(AbortRequest(rid))

    def _admitted(self, req: GenerateRequest, tokenizer: TextTokenizer) -> Admitted:
        """The request as the next stage takes it, or the refusal the gateway gets."""
        try:
            return self.admit(req, tokenizer)
        except RequestInvalid as exc:
            return RequestError(req.request_id, exc.error)
        except Exception as exc:  # a bug must cost one request, never the stage
            self.log.exception("tokenizer error", request_id=req.request_id)
            return RequestError(req.request_id, internal_error(exc))

    async def _send_on(self, admitted: Admitted, t0: float) -> None:
        rid = admitted.request_id
        if isinstance(admitted, RequestError):
            await self.to_gateway.send(admitted)
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
        """A request still on the worker thread ends there; otherwise the abort goes on."""
        if msg.request_id in self.offloaded:
            self.offloaded[msg.request_id] = True
            return
        await self._pass_abort(msg)

    async def _pass_abort(self, msg: AbortRequest) -> None:
        """Forward to the image stage that may hold the request and to the scheduler: whichever
        knows it acts, the other ignores it (the image stage's copy reaches the scheduler after
        the request itself, on the same socket)."""
        if self.to_images:
            await self.to_images[owner(msg.request_id, len(self.to_images))].send(msg)
        await self.to_scheduler.send(msg)

    async def on_tokenize(self, req: TokenizeRequest | DetokenizeRequest) -> None:
        """Answer /tokenize or /detokenize (a long text on the worker thread); a refusal travels
        back in the reply."""
        if isinstance(req, TokenizeRequest) and request_chars(req) >= OFFLOAD_CHARS:
            self.tasks.start_soon(self._tokenize_on_worker, req)
            return
        await self.to_gateway.send(self._tokenize_reply(req, self.tokenizer))

    async def _tokenize_on_worker(self, req: TokenizeRequest) -> None:
        reply = await anyio.to_thread.run_sync(
            self._tokenize_reply, req, self.worker_tokenizer, limiter=self.worker
        )
        await self.to_gateway.send(reply)

    def _tokenize_reply(
        self, req: TokenizeRequest | DetokenizeRequest, tokenizer: TextTokenizer
    ) -> TokenizeReply:
        rid = req.request_id
        try:
            if isinstance(req, TokenizeRequest):
                return self.tokenize(req, tokenizer)
            return self.detokenize(req)
        except RequestInvalid as exc:
            return TokenizeReply(rid, error=exc.error)
        except Exception as exc:  # a bug must cost one request, never the stage
            self.log.exception("tokenize error", request_id=rid)
            return TokenizeReply(rid, error=internal_error(exc))

    def tokenize(self, req: TokenizeRequest, tokenizer: TextTokenizer) -> TokenizeReply:
        """The ids generation would run for this prompt or these messages (text only)."""
        if (req.prompt is None) == (req.messages is None):
            raise RequestInvalid("give exactly one of prompt or messages")
        if req.messages is not None:
            ids, sources = self._render_chat(
                tokenizer,
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
            ids = tokenizer.encode(req.prompt, add_special_tokens=add_special)
        else:
            raise RequestInvalid("prompt must be a string", param="prompt")
        strs = None
        if req.return_token_strs:
            strs = [tokenizer.id_to_token(i) or "" for i in ids]
        return TokenizeReply(req.request_id, ids, strs, max_model_len=self.facts.max_model_len)

    def detokenize(self, req: DetokenizeRequest) -> TokenizeReply:
        ids = req.token_ids
        if not isinstance(ids, list):
            raise RequestInvalid("tokens must be a list of token ids", param="tokens")
        if ids:
            admission.check_prompt_ids(ids, self.facts.vocab_size, "tokens")
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return TokenizeReply(req.request_id, text=text, max_model_len=self.facts.max_model_len)

    def admit(
        self, req: GenerateRequest, tokenizer: TextTokenizer
    ) -> EngineRequest | PendingImages:
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
                tokenizer,
                req.messages,
                req.add_generation_prompt,
                req.continue_final_message,
                req.chat_template_kwargs,
                req.tools,
                req.chat_template,
            )
        elif req.prompt is not None:
            ids = tokenizer.encode(req.prompt, add_special_tokens=True)
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
        tokenizer: TextTokenizer,
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
            ids = tokenizer.encode_chat(
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
