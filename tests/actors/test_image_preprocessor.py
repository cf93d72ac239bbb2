"""The image stage over real sockets, behind a real tokenizer stage: pixels go to the executor
ranks, then the stream opens, then the request reaches the scheduler with its images expanded and
max_tokens resolved; an abort cancels a request still fetching, or follows one already sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from actors.image_preprocessor import ImagePreprocessorActor, Prepared
from protocols.messages import (
    AbortRequest,
    EngineRequest,
    GenerateRequest,
    ImagePixels,
    PendingImages,
    RequestError,
    SamplingParams,
    StreamOpen,
)
from tests.actors.front_stages import Peers, data_url, facts, running
from tests.fixtures.vl_checkpoint import IMAGE_TOKEN_ID


def ask(rid: str, *urls: str, **sampling: Any) -> GenerateRequest:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    parts.append({"type": "text", "text": "Describe."})
    return GenerateRequest(
        rid, SamplingParams(**sampling), messages=[{"role": "user", "content": parts}]
    )


def run(tmp_path: Path, body: Any, max_model_len: int = 512) -> None:
    async def main() -> None:
        async with running(tmp_path, facts(True, max_model_len), with_images=True) as peers:
            await body(peers)

    anyio.run(main)


def test_pixels_then_stream_then_the_expanded_request(tmp_path: Path) -> None:
    a, b = data_url(56, 56), data_url(84, 28, shade=10)

    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(ask("r1", a, b, a))
        pixels = [await peers.next(peers.media) for _ in range(2)]  # one copy per distinct image
        opened = await peers.next(peers.detokenizer)
        req = await peers.next(peers.scheduler)
        assert all(isinstance(p, ImagePixels) and p.request_id == "r1" for p in pixels)
        assert isinstance(opened, StreamOpen) and isinstance(req, EngineRequest)
        assert [p.content_hash for p in pixels] == [
            req.images[0].content_hash,
            req.images[1].content_hash,
        ]
        assert req.images[0].content_hash == req.images[2].content_hash
        assert [im.original_size for im in req.images] == [[56, 56], [84, 28], [56, 56]]
        sizes = opened.mm_info["images"]  # type: ignore[index]
        assert [s["original_size"] for s in sizes] == [[56, 56], [84, 28], [56, 56]]
        ids = req.prompt_token_ids
        for im in req.images:  # each placeholder expanded to one token per merged patch
            assert ids[im.offset : im.offset + im.length] == [IMAGE_TOKEN_ID] * im.length
            grid = im.grid_thw
            assert im.length == grid[0] * grid[1] * grid[2] // 4
            assert pixels[0].grid_thw == req.images[0].grid_thw
        assert ids.count(IMAGE_TOKEN_ID) == sum(im.length for im in req.images)
        assert req.max_tokens == 512 - len(ids)  # resolved on the expanded prompt
        assert opened.prompt_tail_ids == ids[-len(opened.prompt_tail_ids) :]

    run(tmp_path, body)


def test_max_tokens_is_checked_on_the_expanded_prompt(tmp_path: Path) -> None:
    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(ask("big", data_url(280, 280), max_tokens=4))
        err = await peers.next(peers.gateway)
        assert isinstance(err, RequestError) and err.error.param == "messages"
        assert "maximum context length is 96 tokens" in err.error.message

    run(tmp_path, body, max_model_len=96)  # the unexpanded prompt fits, 100 image tokens do not


def test_a_bad_image_is_a_400_naming_it(tmp_path: Path) -> None:
    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(ask("bad", data_url(28, 28), "data:image/png;base64,@@"))
        err = await peers.next(peers.gateway)
        assert err.error.code == 400 and "image 2" in err.error.message

    run(tmp_path, body)


def test_an_abort_cancels_a_request_still_fetching(tmp_path: Path) -> None:
    cancelled = anyio.Event()

    async def body(peers: Peers) -> None:
        stage = peers.actors["images0"]
        assert isinstance(stage, ImagePreprocessorActor)
        real_prepare = stage.prepare

        async def prepare(req: PendingImages) -> Prepared:
            if req.request_id == "slow":
                try:
                    await anyio.sleep_forever()
                finally:
                    cancelled.set()
            return await real_prepare(req)

        stage.prepare = prepare  # type: ignore[method-assign]
        await peers.to_tokenizer.send(ask("slow", data_url(28, 28)))
        await peers.to_tokenizer.send(AbortRequest("slow"))
        with anyio.fail_after(60):
            await cancelled.wait()
        assert isinstance(await peers.next(peers.scheduler), AbortRequest)  # the tokenizer's copy
        await peers.to_tokenizer.send(ask("next", data_url(28, 28)))
        # The image stage sent nothing of the cancelled request, not even the abort: what it
        # sends next (on each socket, in order) is the next request's.
        assert (await peers.next(peers.media)).request_id == "next"
        assert (await peers.next(peers.detokenizer)).request_id == "next"
        after = await peers.next(peers.scheduler)
        assert isinstance(after, EngineRequest) and after.request_id == "next"

    run(tmp_path, body)


def test_an_abort_after_the_request_went_on_follows_it_to_the_scheduler(tmp_path: Path) -> None:
    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(ask("r", data_url(28, 28)))
        assert isinstance(await peers.next(peers.scheduler), EngineRequest)
        await peers.to_tokenizer.send(AbortRequest("r"))
        copies = [await peers.next(peers.scheduler) for _ in range(2)]  # tokenizer's, image's
        assert all(isinstance(c, AbortRequest) and c.request_id == "r" for c in copies)

    run(tmp_path, body)
