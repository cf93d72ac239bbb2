"""The FastAPI app of the OpenAI-compatible API: routes, error bodies, stream or collect.

HTTP request -> schemas -> convert -> AsyncEngineClient.generate -> JSON body or SSE stream.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.config import EngineConfig
from protocols.limits import RequestLimits
from protocols.messages import (
    DetokenizeRequest,
    EngineFacts,
    ErrorInfo,
    GenerateRequest,
    RequestOutput,
    TokenizeReply,
    TokenizeRequest,
)
from protocols.openai import bodies, caps, convert
from protocols.openai.auth import UNGUARDED_PATHS, ApiKeyGuard
from protocols.openai.bodies import Collected, Echo
from protocols.openai.convert import OpenAIError, error_body
from protocols.openai.drain import RETRY_AFTER_S
from protocols.openai.gate import RequestGate
from protocols.openai.responses import (
    ResponseEvents,
    ResponsesRequest,
    chat_body,
    response_object,
)
from protocols.openai.responses import new_ids as new_response_ids
from protocols.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeBody,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    WireValueError,
)
from protocols.openai.stream import (
    ChatChunks,
    ChunkRenderer,
    CompletionChunks,
    close_quietly,
    failure_of,
    sse,
    usage_options,
)

if TYPE_CHECKING:
    from protocols.client import AsyncEngineClient

HEALTH_TIMEOUT_S = 5.0
Responder = Callable[[list[Collected]], dict[str, Any]]  # every choice's generation -> the body
Stream = AsyncGenerator[RequestOutput, None]


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def error_response(info: ErrorInfo) -> Response:
    status = info.code if 400 <= info.code < 600 else 500
    response = json_response(error_body(info), status)
    if status == 503:  # a stage was lost or the engine is restarting: worth a retry
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's errors as one message naming each field (never quoting the values)."""
    parts, param = [], None
    for err in exc.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, WireValueError):  # names its own place inside the body
            param = param or cause.param
            parts.append(str(cause))
            continue
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = param or (".".join(loc) or None)
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field: this server does not implement it (leave it out)"
        parts.append(f"{'.'.join(loc) or 'body'}: {msg}")
    return "; ".join(parts) or "invalid request", param


class EventStreamResponse(StreamingResponse):
    """A StreamingResponse that always closes its body, so a dropped client aborts the request."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await close_quietly(self.body_iterator)  # type: ignore[arg-type]


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first(outputs: Stream, request_id: str) -> RequestOutput:
    """A stream's first increment: it submits the request and carries an early refusal."""
    try:
        return await outputs.__anext__()
    except StopAsyncIteration:
        return RequestOutput(request_id=request_id, finish_reason="error")


async def _collect(
    streams: list[Stream], firsts: list[RequestOutput], request: Request
) -> list[Collected] | ErrorInfo | None:
    """Fold whole generations, one per choice; None if the HTTP client went away first (the
    requests are aborted). The engine runs them together, whatever order they are folded in."""

    async def fold(outputs: Stream, first: RequestOutput) -> Collected | ErrorInfo:
        c = Collected()
        out = first
        while True:
            failure = failure_of(out)
            if failure is not None:
                return failure
            c.add(out)
            if c.final is not None:
                return c
            try:
                out = await outputs.__anext__()
            except StopAsyncIteration:
                return ErrorInfo("the engine stream ended early", "InternalServerError", None, 500)

    async def fold_all() -> list[Collected] | ErrorInfo:
        done = []
        for outputs, first in zip(streams, firsts, strict=True):
            c = await fold(outputs, first)
            if isinstance(c, ErrorInfo):
                return c
            done.append(c)
        return done

    folding = asyncio.ensure_future(fold_all())
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({folding, watching}, return_when=asyncio.FIRST_COMPLETED)
        return folding.result() if folding.done() else None
    finally:
        watching.cancel()
        if not folding.done():  # let the fold unwind before the stream is closed under it
            folding.cancel()
            with anyio.move_on_after(5, shield=True):
                await asyncio.wait({folding})
        for outputs in streams:
            await close_quietly(outputs)


async def _tokenize_body(request: Request) -> TokenizeCompletionRequest | TokenizeChatRequest:
    """/tokenize takes vLLM's two bodies: with `messages` a chat, else a prompt."""
    try:
        data = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(f"the body is not valid JSON: {exc}") from exc
    schema = (
        TokenizeChatRequest
        if isinstance(data, dict) and "messages" in data
        else TokenizeCompletionRequest
    )
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


def build_app(
    client: AsyncEngineClient,
    config: EngineConfig,
    sampling_defaults: dict[str, Any] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app over one engine client; `config` gives names and the API key,
    `sampling_defaults` (generation_config.json's) the values of sampling fields a request leaves
    unset."""
    defaults = dict(sampling_defaults or {})
    served = config.accepted_model_names  # what a request may name; /v1/models lists model_names
    engine: EngineFacts | None = None  # the engine's facts, once a health check returned them
    try:
        tessera_version = version("tessera")
    except PackageNotFoundError:
        tessera_version = "0.0.0+unknown"

    limits = RequestLimits.of(config)
    app = FastAPI(title="Tessera", version=tessera_version, root_path=config.root_path)
    app.add_middleware(RequestGate, config=config)  # innermost: after CORS and the API key
    if config.api_key:  # added before CORS, so CORS (outermost) answers preflights and 401s too
        public = UNGUARDED_PATHS + (("/metrics",) if config.public_metrics else ())
        app.add_middleware(ApiKeyGuard, api_key=config.api_key, public=public)
    if config.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    v1 = APIRouter(prefix="/v1")
    tokens = APIRouter()

    @app.exception_handler(OpenAIError)
    async def on_openai_error(_: Request, exc: OpenAIError) -> Response:
        return error_response(exc.info)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return error_response(ErrorInfo(message, "BadRequestError", param, 400))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(
            exc.status_code, "BadRequestError"
        )
        return error_response(ErrorInfo(str(exc.detail), kind, None, exc.status_code))

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> Response:
        structlog.get_logger().exception("http error", actor="http")
        # its kind only: the text of an exception may quote internals; the log has the rest
        return error_response(
            ErrorInfo(
                f"internal error ({type(exc).__name__}); see the server log",
                "InternalServerError",
                None,
                500,
            )
        )

    async def engine_facts() -> EngineFacts | None:
        nonlocal engine
        if engine is None:
            try:
                engine = (await client.health(timeout=HEALTH_TIMEOUT_S)).facts
            except Exception:
                pass
        return engine

    async def max_model_len() -> int | None:
        facts = await engine_facts()
        return facts.max_model_len if facts else config.max_model_len

    async def generate(
        gens: list[GenerateRequest],
        request: Request,
        renderers: list[ChunkRenderer],
        stream: bool,
        respond: Responder,
    ) -> Response:
        """Run one request per choice together; a refusal of any refuses the whole response."""
        streams = [client.generate(gen) for gen in gens]
        try:
            firsts = list(
                await asyncio.gather(*(_first(s, g.request_id) for s, g in zip(streams, gens)))
            )
        except BaseException:
            for outputs in streams:
                await close_quietly(outputs)
            raise
        failure = next((f for f in map(failure_of, firsts) if f is not None), None)
        if failure is not None:
            for outputs in streams:
                await close_quietly(outputs)
            return error_response(failure)
        if stream:
            return EventStreamResponse(
                sse(firsts, streams, renderers),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        result = await _collect(streams, firsts, request)
        if result is None:  # the client left; nobody reads this
            return Response(status_code=499)
        if isinstance(result, ErrorInfo):
            return error_response(result)
        return json_response(respond(result))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        model = convert.resolve_model(body.model, served)
        caps.check_chat(body, limits, await max_model_len())
        rid = uuid.uuid4().hex
        gens = convert.chat_requests(body, rid, defaults)
        parser = convert.tool_parser_for(
            body, config.enable_auto_tool_choice, config.tool_call_parser
        )
        parallel = body.parallel_tool_calls is not False
        boxes = body.tessera is not None and body.tessera.boxes
        include_usage, continuous = usage_options(body.stream_options)
        created, top_k = int(time.time()), gens[0].sampling.logprobs
        renderers: list[ChunkRenderer] = [
            ChatChunks(
                f"chatcmpl-{rid}",
                created,
                model,
                include_usage,
                top_k,
                index=k,
                shared=len(gens),
                continuous_usage=continuous,
                tool_parser=parser,
                parallel_tool_calls=parallel,
                boxes=boxes and k == 0,
            )
            for k in range(len(gens))
        ]

        def respond(done: list[Collected]) -> dict[str, Any]:
            return bodies.chat_response(
                done, f"chatcmpl-{rid}", created, model, top_k, parser, parallel, boxes
            )

        return await generate(gens, request, renderers, body.stream, respond)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        model = convert.resolve_model(body.model, served)
        caps.check_completion(body, limits, await max_model_len())
        rid = uuid.uuid4().hex
        gens = convert.completion_requests(body, rid, defaults)
        n = convert.choices_per_prompt(body)
        include_usage, continuous = usage_options(body.stream_options)
        created, top_k = int(time.time()), gens[0].sampling.logprobs
        echoes = await echo_of(body, gens)
        renderers: list[ChunkRenderer] = [
            CompletionChunks(
                f"cmpl-{rid}",
                created,
                model,
                include_usage,
                top_k,
                index=i,
                shared=n,
                continuous_usage=continuous,
                echo=echoes[i] if echoes else None,
            )
            for i in range(len(gens))
        ]

        def respond(done: list[Collected]) -> dict[str, Any]:
            return bodies.completion_response(done, f"cmpl-{rid}", created, model, top_k, n, echoes)

        return await generate(gens, request, renderers, body.stream, respond)

    async def echo_of(body: CompletionRequest, gens: list[GenerateRequest]) -> list[Echo] | None:
        """Each choice's Echo (None when the request neither echoes nor asks prompt_logprobs):
        a text prompt echoes as sent, token ids as the tokenizer stage decodes them."""
        if not body.echo and body.prompt_logprobs is None:
            return None
        texts: dict[tuple[int, ...], str] = {}
        echoes = []
        for gen in gens:
            text = None
            if body.echo:
                text = gen.prompt
                if text is None:
                    ids = tuple(gen.prompt_token_ids or [])
                    if ids not in texts:
                        record = DetokenizeRequest("detok-" + uuid.uuid4().hex, list(ids))
                        texts[ids] = (await tokenizer_reply(record)).text
                    text = texts[ids]
            top_k = gen.sampling.logprobs if body.echo else None
            echoes.append(Echo(text, top_k, body.prompt_logprobs))
        return echoes

    @v1.post("/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        """OpenAI's Responses API, stateless, over the chat path (protocols/openai/responses.py)."""
        model = convert.resolve_model(body.model, served)
        response_id, item_id = new_response_ids()
        chat = chat_body(body)
        caps.check_chat(chat, limits, await max_model_len())
        gens = convert.chat_requests(chat, response_id, defaults)
        created = int(time.time())
        renderer = ResponseEvents(
            response_id, created, model, False, None, item_id=item_id, metadata=body.metadata
        )

        def respond(done: list[Collected]) -> dict[str, Any]:
            c = done[0]
            return response_object(
                response_id,
                created,
                model,
                item_id,
                c.text,
                c.final,
                len(c.token_ids),
                body.metadata,
            )

        return await generate(gens, request, [renderer], body.stream, respond)

    def model_card(name: str, facts: EngineFacts | None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "tessera",
            "root": name,  # the served name: the checkpoint's path is the server's business
            "parent": None,
            "max_model_len": facts.max_model_len if facts else config.max_model_len,
        }

    @v1.get("/models")
    async def list_models() -> Response:
        facts = await engine_facts()
        cards = [model_card(n, facts) for n in config.model_names]
        return json_response({"object": "list", "data": cards})

    @v1.get("/models/{name:path}")
    async def retrieve_model(name: str) -> Response:
        convert.resolve_model(name, served)
        return json_response(model_card(name, await engine_facts()))

    async def tokenizer_reply(record: TokenizeRequest | DetokenizeRequest) -> TokenizeReply:
        """The tokenizer stage's answer; a refusal raises the OpenAIError it carries."""
        try:
            reply = await client.tokenize(record)
        except TimeoutError as exc:
            raise OpenAIError(
                "the engine did not answer in time", type="ServiceUnavailableError", code=503
            ) from exc
        if reply.error is not None:
            e = reply.error
            raise OpenAIError(e.message, type=e.type, param=e.param, code=e.code)
        return reply

    @tokens.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        """vLLM's /tokenize: the prompt's or the messages' token ids, as generation makes them."""
        body = await _tokenize_body(request)
        convert.resolve_model(body.model, served)
        caps.check_tokenize(body, limits)
        record = convert.tokenize_request(body, "tok-" + uuid.uuid4().hex)
        return json_response(convert.tokenize_response(await tokenizer_reply(record)))

    @tokens.post("/detokenize")
    async def detokenize(body: DetokenizeBody) -> Response:
        """vLLM's /detokenize: {"tokens": [...]} -> {"prompt": text}."""
        convert.resolve_model(body.model, served)
        record = convert.detokenize_request(body, "detok-" + uuid.uuid4().hex)
        return json_response({"prompt": (await tokenizer_reply(record)).text})

    app.include_router(v1)
    app.include_router(tokens)

    @app.get("/ping")
    @app.post("/ping")
    @app.get("/health")
    async def health() -> Response:
        nonlocal engine
        try:
            reply = await client.health(timeout=HEALTH_TIMEOUT_S)
        except Exception:
            return error_response(
                ErrorInfo("engine unreachable", "ServiceUnavailableError", None, 503)
            )
        if not reply.ready:
            return error_response(
                ErrorInfo("engine not ready", "ServiceUnavailableError", None, 503)
            )
        engine = reply.facts or engine
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(registry)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def get_version() -> Response:
        return json_response({"version": tessera_version})

    return app
