"""Image preprocessor stage: fetch, decode and resize each image and expand its placeholder
tokens, so the scheduler sees an ordinary `EngineRequest` and the executors already hold pixels.

tokenizer -> (this stage, for requests with images) -> every executor rank (ImagePixels),
the owning detokenizer (StreamOpen), then the scheduler (EngineRequest). Each request is its own
task: one slow URL never holds back the others, and an abort cancels only its request's task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np

from actors import metrics
from actors.admission import RequestInvalid, resolve_max_tokens
from actors.media import MediaError, MediaPolicy, content_hash, load_image
from core.codec import Buffer
from core.launch.addresses import owner
from models.detokenizer import PROMPT_CONTEXT
from models.image_processing import ImageProcessorConfig, ProcessedImage, preprocess_image
from protocols.messages import (
    AbortRequest,
    EngineRequest,
    ErrorInfo,
    ImagePixels,
    ImageRef,
    PendingImages,
    RequestError,
    RequestMoved,
    StreamOpen,
)
from protocols.stage import Stage


@dataclass
class Prepared:
    """A request whose images are ready: what this stage sends, in the order it sends it."""

    pixels: list[ImagePixels]
    stream: StreamOpen
    request: EngineRequest


def array_buffer(array: np.ndarray) -> Buffer:
    """A numpy array as a wire Buffer (its bytes travel as their own frame, uncopied)."""
    array = np.ascontiguousarray(array)
    return Buffer(array.dtype.name, list(array.shape), array.data)


class ImagePreprocessorActor(Stage):
    async def setup(self) -> dict[str, Any]:
        self.processor = (
            ImageProcessorConfig.load(self.config.model) if self.facts.accepts_images else None
        )
        self.policy = MediaPolicy(
            allowed_local_media_path=self.config.allowed_local_media_path,
            allowed_media_domains=list(self.config.allowed_media_domains),
        )
        a = self.addresses
        self.inbox = self.transport.mailbox(a.images[self.index])
        # bound here, one per rank: every executor (on any host) connects to each image replica
        self.to_media = [
            self.transport.outbox(address, bind=True) for address in a.media[self.index]
        ]
        self.to_detokenizers = [self.transport.outbox(address) for address in a.detokenizers]
        self.to_scheduler = self.transport.outbox(a.scheduler)
        self.to_gateway = self.transport.outbox(a.gateway)
        self.fetching: dict[str, anyio.CancelScope] = {}  # request id -> its task, until it sends
        self.sending: set[str] = set()  # requests whose records are on their way out
        self.late_aborts: dict[str, AbortRequest] = {}  # aborted while sending: forward after
        return {}

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:

            async def spawn(req: PendingImages) -> None:
                await self.to_gateway.send(RequestMoved(req.request_id, "images"))  # it is here
                scope = anyio.CancelScope()
                self.fetching[req.request_id] = scope  # before the task starts: aborts see it
                tg.start_soon(self.process, req, scope)

            await self.serve(self.inbox, {PendingImages: spawn, AbortRequest: self.on_abort})

    async def on_abort(self, msg: AbortRequest) -> None:
        rid = msg.request_id
        scope = self.fetching.pop(rid, None)
        if scope is not None:
            scope.cancel()  # nothing was sent for it: nothing downstream to undo
        elif rid in self.sending:
            self.late_aborts[rid] = msg  # must follow the request on the scheduler socket
        else:
            await self.to_scheduler.send(msg)  # after the request, on the same socket

    async def process(self, req: PendingImages, scope: anyio.CancelScope) -> None:
        rid = req.request_id
        t0 = time.perf_counter()
        error: ErrorInfo | None = None
        prepared: Prepared | None = None
        with scope:
            try:
                prepared = await self.prepare(req)
            except (RequestInvalid, MediaError, ValueError) as exc:
                error = ErrorInfo(str(exc), param=getattr(exc, "param", None) or "messages")
            except Exception as exc:  # a bug costs one request, never the stage
                self.log.exception("image stage error", request_id=rid)
                error = ErrorInfo(
                    f"internal error in the image stage ({type(exc).__name__}); see the server log",
                    type="InternalServerError",
                    code=500,
                )
        if self.fetching.pop(rid, None) is None:
            return  # aborted while fetching: the client is gone
        if error is not None:
            await self.to_gateway.send(RequestError(rid, error))
            return
        assert prepared is not None
        metrics.stage_latency.labels("image_preprocessor").observe(time.perf_counter() - t0)
        self.log.debug(
            "images ready",
            request_id=rid,
            images=len(prepared.request.images),
            prompt_tokens=len(prepared.request.prompt_token_ids),
        )
        self.sending.add(rid)
        try:
            with anyio.CancelScope(shield=True):  # all or nothing: pixels, stream, then request
                for pixels in prepared.pixels:
                    for media in self.to_media:
                        await media.send(pixels)
                detok = self.to_detokenizers[owner(rid, len(self.to_detokenizers))]
                await detok.send(prepared.stream)
                await self.to_scheduler.send(prepared.request)
                late = self.late_aborts.pop(rid, None)
                if late is not None:
                    await self.to_scheduler.send(late)
        finally:
            self.sending.discard(rid)
            self.late_aborts.pop(rid, None)

    async def prepare(self, req: PendingImages) -> Prepared:
        processor = self.processor
        assert processor is not None  # admission refuses images for a text-only model
        kwargs = req.mm_processor_kwargs  # checked by admission
        images: list[Any] = [None] * len(req.image_sources)

        async def fetch(i: int, src: str) -> None:
            try:
                img, _ = await load_image(src, self.policy)
            except MediaError as exc:
                raise MediaError(f"image {i + 1}: {exc}") from exc
            processed = await anyio.to_thread.run_sync(
                lambda: preprocess_image(img, processor, **kwargs)
            )
            images[i] = (processed, content_hash(img))

        try:
            async with anyio.create_task_group() as tg:
                for i, src in enumerate(req.image_sources):
                    tg.start_soon(fetch, i, src)
        except BaseExceptionGroup as group:  # report the first failure by itself
            raise group.exceptions[0] from None
        return self._expand(req, images)

    def _expand(self, req: PendingImages, images: list[tuple[ProcessedImage, str]]) -> Prepared:
        """Replace each single image placeholder with one token per merged patch."""
        image_token_id = self.facts.image_token_id
        ids: list[int] = []
        refs: list[ImageRef] = []
        pixels: dict[str, ImagePixels] = {}  # one copy of each distinct image
        k = 0
        for tok in req.prompt_token_ids:
            if tok != image_token_id:
                ids.append(tok)
                continue
            processed, digest = images[k]
            k += 1
            refs.append(
                ImageRef(
                    content_hash=digest,
                    offset=len(ids),
                    length=processed.num_tokens,
                    grid_thw=list(processed.grid_thw),
                    original_size=list(processed.original_size),
                    resized_size=list(processed.resized_size),
                )
            )
            if digest not in pixels:
                pixels[digest] = ImagePixels(
                    req.request_id,
                    digest,
                    list(processed.grid_thw),
                    array_buffer(processed.patches),
                    None if processed.value_table is None else array_buffer(processed.value_table),
                )
            ids.extend([tok] * processed.num_tokens)
        request = EngineRequest(
            request_id=req.request_id,
            prompt_token_ids=ids,
            sampling=req.sampling,
            max_tokens=resolve_max_tokens(len(ids), req.sampling, self.facts.max_model_len),
            eos_token_ids=req.eos_token_ids,
            images=refs,
            arrival_time=req.arrival_time,
        )
        sizes = [{"original_size": r.original_size, "resized_size": r.resized_size} for r in refs]
        stream = StreamOpen(
            req.request_id,
            req.sampling,
            prompt_tail_ids=ids[-PROMPT_CONTEXT:],
            mm_info={"images": sizes},
        )
        return Prepared(list(pixels.values()), stream, request)
