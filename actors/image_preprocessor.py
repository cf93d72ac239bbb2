"""Image preprocessor stage: fetch, decode and resize each image, expand its placeholder tokens,
and compute the M-RoPE positions, so the scheduler and executor stay model-agnostic.

tokenizer -> (this stage, when a request has images) -> scheduler. Each request is its own task:
one slow URL never holds back the others.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import numpy as np

from actors import metrics
from actors.limits import RequestInvalid, resolve_max_tokens
from actors.media import MediaError, MediaPolicy, content_hash, load_image
from core.actor import Actor
from core.codec import Buffer
from models.image_processing import ImageProcessorConfig, ProcessedImage, preprocess_image
from models.mrope import mrope_positions
from protocols.messages import ErrorInfo, ImageInput, RequestError, TokenizedRequest

MM_KWARGS = {"min_pixels", "max_pixels"}


class ImagePreprocessorActor(Actor):
    async def setup(self) -> dict[str, Any]:
        info = self.engine_info
        self.max_model_len = int(info["max_model_len"])
        self.image_token_id = info.get("image_token_id")
        self.merge_size = int(info.get("spatial_merge_size") or 2)
        self.processor = (
            ImageProcessorConfig.load(self.config.model)
            if self.image_token_id is not None
            else None
        )
        self.policy = MediaPolicy(
            allowed_local_media_path=self.config.allowed_local_media_path,
            allowed_media_domains=list(self.config.allowed_media_domains),
        )
        self.inbox = self.transport.mailbox(self.addresses.images[self.index])
        self.to_scheduler = self.transport.outbox(self.addresses.scheduler)
        self.to_gateway = self.transport.outbox(self.addresses.gateway)
        return {}

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:

            async def spawn(req: TokenizedRequest) -> None:
                tg.start_soon(self.process, req)

            await self.serve(self.inbox, {TokenizedRequest: spawn})

    async def process(self, req: TokenizedRequest) -> None:
        t0 = time.perf_counter()
        try:
            ready = await self.prepare(req)
        except (RequestInvalid, MediaError, ValueError) as exc:
            param = getattr(exc, "param", None) or "messages"
            await self.to_gateway.send(
                RequestError(req.request_id, ErrorInfo(str(exc), param=param))
            )
            return
        except Exception as exc:  # a bug costs one request, never the stage
            self.log.exception("image stage error", request_id=req.request_id)
            err = ErrorInfo(f"internal error: {exc}", type="InternalServerError", code=500)
            await self.to_gateway.send(RequestError(req.request_id, err))
            return
        metrics.stage_latency.labels("image_preprocessor").observe(time.perf_counter() - t0)
        self.log.debug(
            "images ready",
            request_id=req.request_id,
            images=len(ready.images),
            prompt_tokens=len(ready.prompt_token_ids),
        )
        await self.to_scheduler.send(ready)

    async def prepare(self, req: TokenizedRequest) -> TokenizedRequest:
        if self.processor is None or self.image_token_id is None:
            raise RequestInvalid("this model accepts text only: remove the image parts")
        kwargs = {k: int(v) for k, v in req.mm_processor_kwargs.items() if k in MM_KWARGS}
        unknown = set(req.mm_processor_kwargs) - MM_KWARGS
        if unknown:
            raise RequestInvalid(
                f"unsupported mm_processor_kwargs: {sorted(unknown)}", param="mm_processor_kwargs"
            )
        images: list[Any] = [None] * len(req.image_sources)

        async def fetch(i: int, src: str) -> None:
            try:
                img, _ = await load_image(src, self.policy)
            except MediaError as exc:
                raise MediaError(f"image {i + 1}: {exc}") from exc
            processed = await anyio.to_thread.run_sync(
                lambda: preprocess_image(img, self.processor, **kwargs)
            )
            images[i] = (processed, content_hash(img))

        try:
            async with anyio.create_task_group() as tg:
                for i, src in enumerate(req.image_sources):
                    tg.start_soon(fetch, i, src)
        except BaseExceptionGroup as group:  # report the first failure by itself
            raise group.exceptions[0] from None
        return self._expand(req, images)

    def _expand(
        self, req: TokenizedRequest, images: list[tuple[ProcessedImage, str]]
    ) -> TokenizedRequest:
        """Replace each single image placeholder with one token per merged patch."""
        ids: list[int] = []
        inputs: list[ImageInput] = []
        k = 0
        for tok in req.prompt_token_ids:
            if tok != self.image_token_id:
                ids.append(tok)
                continue
            processed, digest = images[k]
            k += 1
            pv = np.ascontiguousarray(processed.pixel_values, dtype=np.float32)
            inputs.append(
                ImageInput(
                    content_hash=digest,
                    offset=len(ids),
                    length=processed.num_tokens,
                    grid_thw=list(processed.grid_thw),
                    pixel_values=Buffer("float32", list(pv.shape), pv.data),
                    original_size=list(processed.original_size),
                    resized_size=list(processed.resized_size),
                )
            )
            ids.extend([tok] * processed.num_tokens)
        req.max_tokens = resolve_max_tokens(len(ids), req.sampling.max_tokens, self.max_model_len)
        positions, delta = mrope_positions(
            ids, [tuple(im.grid_thw) for im in inputs], self.image_token_id, self.merge_size
        )
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        req.prompt_token_ids = ids
        req.images = inputs
        req.mrope_positions = Buffer("int64", list(pos.shape), pos.data)
        req.mrope_position_delta = int(delta)
        req.image_sources = []
        return req
