"""The tokenizer stage over real sockets: a text request opens its stream then goes to the
scheduler, an image request goes to the image stage, refusals go to the gateway only, and an
abort follows the request's path (image stage and scheduler)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio

from models.detokenizer import PROMPT_CONTEXT
from models.tokenizer import TextTokenizer
from protocols.messages import (
    AbortRequest,
    EngineRequest,
    GenerateRequest,
    PendingImages,
    RequestError,
    SamplingParams,
    StreamOpen,
)
from tests.actors.front_stages import Peers, data_url, facts, running
from tests.fixtures.checkpoints import QWEN_EOS, tokenizer_dir
from tests.fixtures.vl_checkpoint import IMAGE_TOKEN_ID


def chat(rid: str, *parts: Any, **sampling: Any) -> GenerateRequest:
    content: Any = list(parts) if parts else "Hello there"
    return GenerateRequest(
        rid, SamplingParams(**sampling), messages=[{"role": "user", "content": content}]
    )


def run(tmp_path: Path, body: Any, images: bool = True, max_model_len: int = 512) -> None:
    async def main() -> None:
        async with running(tmp_path, facts(images, max_model_len)) as peers:
            await body(peers)

    anyio.run(main)


def test_text_request_opens_its_stream_then_goes_to_the_scheduler(tmp_path: Path) -> None:
    tok = TextTokenizer.load(str(tokenizer_dir()))
    ids = tok.encode("The sea and the sky, and the long grey road")

    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(
            GenerateRequest("t1", SamplingParams(max_tokens=7), prompt_token_ids=ids)
        )
        await peers.to_tokenizer.send(
            GenerateRequest("t2", SamplingParams(stop=["x"]), prompt="Hi")
        )
        opened = [await peers.next(peers.detokenizer) for _ in range(2)]
        sent = [await peers.next(peers.scheduler) for _ in range(2)]
        assert all(isinstance(r, StreamOpen) for r in opened)
        assert all(isinstance(r, EngineRequest) for r in sent)
        assert opened[0].prompt_tail_ids == ids[-PROMPT_CONTEXT:] and opened[1].sampling.stop == [
            "x"
        ]
        assert sent[0].prompt_token_ids == ids and sent[0].max_tokens == 7
        assert sent[1].prompt_token_ids == tok.encode("Hi")
        assert sent[1].max_tokens == 512 - len(sent[1].prompt_token_ids)  # what the context leaves
        assert sent[0].eos_token_ids == sorted(set(QWEN_EOS))  # the tokenizer's and the model's
        assert sent[0].images == []

    run(tmp_path, body)


TEXT = {"type": "text", "text": "What is in the picture?"}


def refusals() -> list[tuple[GenerateRequest, str | None]]:
    unknown_kwargs = chat("kwargs", {"type": "image_url", "image_url": {"url": "data:x"}})
    unknown_kwargs.mm_processor_kwargs = {"fps": 1}
    too_long = GenerateRequest("long", SamplingParams(max_tokens=1), prompt_token_ids=[9707] * 64)
    return [
        (GenerateRequest("temp", SamplingParams(temperature=-1), prompt="x"), "temperature"),
        (GenerateRequest("vocab", prompt_token_ids=[1, 10**7]), "prompt"),
        (GenerateRequest("empty", prompt=""), "prompt"),
        (GenerateRequest("none"), None),
        (too_long, "messages"),
        (GenerateRequest("role", messages=[{"content": "hi"}]), "messages.0.role"),
        (chat("untyped", {"text": "hi"}), "messages.0.content.0.type"),
        (chat("minmax", max_tokens=2, min_tokens=3), "min_tokens"),
        (unknown_kwargs, "mm_processor_kwargs"),
    ]


def test_refusals_go_to_the_gateway_and_nowhere_else(tmp_path: Path) -> None:
    cases = refusals()

    async def body(peers: Peers) -> None:
        for req, _ in cases:
            await peers.to_tokenizer.send(req)
        await peers.to_tokenizer.send(chat("ok", max_tokens=2))
        errors = [await peers.next(peers.gateway) for _ in cases]
        assert all(isinstance(e, RequestError) and e.error.code == 400 for e in errors)
        assert [(e.request_id, e.error.param) for e in errors] == [
            (req.request_id, param) for req, param in cases
        ]
        assert "maximum context length is 64 tokens" in errors[4].error.message
        # Nothing of the refused requests went on: the next records are the good request's.
        assert (await peers.next(peers.detokenizer)).request_id == "ok"
        assert (await peers.next(peers.scheduler)).request_id == "ok"

    run(tmp_path, body, max_model_len=64)


def test_image_request_goes_to_the_image_stage_with_one_placeholder_each(tmp_path: Path) -> None:
    image: dict[str, Any] = {"type": "image_url", "image_url": {"url": data_url(28, 28)}}
    req = chat("img", image, TEXT, {"type": "image", "image": "data:b"}, max_tokens=3)
    req.mm_processor_kwargs = {"max_pixels": 50000}

    async def body(peers: Peers) -> None:
        assert peers.images is not None
        await peers.to_tokenizer.send(req)
        pending = await peers.next(peers.images)
        assert isinstance(pending, PendingImages)
        assert pending.image_sources == [image["image_url"]["url"], "data:b"]
        assert pending.prompt_token_ids.count(IMAGE_TOKEN_ID) == 2
        assert pending.mm_processor_kwargs == {"max_pixels": 50000}
        assert pending.sampling.max_tokens == 3

    run(tmp_path, body)


def test_a_text_only_model_refuses_images_and_takes_text_parts(tmp_path: Path) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:a"}}

    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(chat("img", TEXT, image))
        await peers.to_tokenizer.send(chat("parts", TEXT, TEXT))
        err = await peers.next(peers.gateway)
        assert err.error.param == "messages.0.content.1" and "text only" in err.error.message
        sent = await peers.next(peers.scheduler)
        assert sent.request_id == "parts" and IMAGE_TOKEN_ID not in sent.prompt_token_ids

    run(tmp_path, body, images=False)


def test_an_abort_goes_to_the_image_stage_and_the_scheduler(tmp_path: Path) -> None:
    async def body(peers: Peers) -> None:
        assert peers.images is not None
        await peers.to_tokenizer.send(AbortRequest("gone"))
        for box in (peers.images, peers.scheduler):
            got = await peers.next(box)
            assert isinstance(got, AbortRequest) and got.request_id == "gone"

    run(tmp_path, body)
