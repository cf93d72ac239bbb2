"""The tokenizer stage over real sockets: a text request opens its stream then goes to the
scheduler, an image request goes to the image stage, refusals go to the gateway only, an abort
follows the request's path (image stage and scheduler), and tokenize / detokenize requests are
answered to the gateway with generation's own tokenizer, chat template and limits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import anyio

from models.detokenizer import PROMPT_CONTEXT
from models.tokenizer import TextTokenizer
from protocols.messages import (
    AbortRequest,
    DetokenizeRequest,
    EngineRequest,
    GenerateRequest,
    PendingImages,
    RequestError,
    SamplingParams,
    StreamOpen,
    TokenizeReply,
    TokenizeRequest,
)
from tests.actors.front_stages import Peers, data_url, facts, running
from tests.fixtures.checkpoints import QWEN_EOS, tokenizer_dir
from tests.fixtures.vl_checkpoint import IMAGE_TOKEN_ID


def chat(rid: str, *parts: Any, **sampling: Any) -> GenerateRequest:
    content: Any = list(parts) if parts else "Hello there"
    return GenerateRequest(
        rid, SamplingParams(**sampling), messages=[{"role": "user", "content": content}]
    )


def run(
    tmp_path: Path, body: Any, images: bool = True, max_model_len: int = 512, **config: Any
) -> None:
    async def main() -> None:
        async with running(tmp_path, facts(images, max_model_len), **config) as peers:
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


HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


def test_tokenize_gives_the_ids_generation_runs(tmp_path: Path) -> None:
    tok = TextTokenizer.load(str(tokenizer_dir()))

    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(GenerateRequest("gen", messages=HELLO))
        await peers.to_tokenizer.send(TokenizeRequest("chat", messages=HELLO))
        await peers.to_tokenizer.send(TokenizeRequest("text", prompt="Hi", return_token_strs=True))
        generated = await peers.next(peers.scheduler)
        chat_reply, text_reply = [await peers.next(peers.gateway) for _ in range(2)]
        assert isinstance(chat_reply, TokenizeReply) and chat_reply.error is None
        assert chat_reply.request_id == "chat" and chat_reply.max_model_len == 512
        assert chat_reply.token_ids == generated.prompt_token_ids
        assert text_reply.token_ids == tok.encode("Hi") and text_reply.token_strs == ["Hi"]

        ids = tok.encode("Hello, world!") + [QWEN_EOS[0]]
        await peers.to_tokenizer.send(DetokenizeRequest("detok", ids))
        reply = await peers.next(peers.gateway)
        assert reply.text == "Hello, world!" + tok.decode([QWEN_EOS[0]], skip_special_tokens=False)

    run(tmp_path, body, images=False)


def test_tokenize_refusals_come_back_in_the_reply(tmp_path: Path) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:a"}}
    cases: list[tuple[TokenizeRequest | DetokenizeRequest, str | None]] = [
        (
            TokenizeRequest("wizard", messages=[{"role": "wizard", "content": "hi"}]),
            "messages.0.role",
        ),
        (TokenizeRequest("both", prompt="x", messages=HELLO), None),
        (TokenizeRequest("image", messages=[{"role": "user", "content": [image]}]), "messages"),
        (DetokenizeRequest("vocab", [10**7]), "tokens"),
    ]

    async def body(peers: Peers) -> None:
        for req, _ in cases:
            await peers.to_tokenizer.send(req)
        replies = [await peers.next(peers.gateway) for _ in cases]
        assert all(isinstance(r, TokenizeReply) and r.error is not None for r in replies)
        assert [(r.request_id, r.error.code, r.error.param) for r in replies] == [
            (req.request_id, 400, param) for req, param in cases
        ]

    run(tmp_path, body)


def test_server_limits_images_and_logprobs(tmp_path: Path) -> None:
    image = {"type": "image_url", "image_url": {"url": data_url(28, 28)}}

    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(chat("two", image, image))
        await peers.to_tokenizer.send(chat("lp", logprobs=3))
        await peers.to_tokenizer.send(chat("one", image, logprobs=2))
        too_many, too_deep = [await peers.next(peers.gateway) for _ in range(2)]
        assert too_many.request_id == "two" and too_many.error.param == "messages"
        assert too_many.error.message.startswith("At most 1 image(s) may be provided")
        assert too_deep.request_id == "lp" and too_deep.error.param == "logprobs"
        assert peers.images is not None
        assert (await peers.next(peers.images)).request_id == "one"

    run(tmp_path, body, limit_mm_per_prompt={"image": 1}, max_logprobs=2)


def test_chat_template_flag_replaces_the_checkpoints(tmp_path: Path) -> None:
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    tok = TextTokenizer.load(str(tokenizer_dir()))
    want = tok.encode("[system] Be brief.\n[user] Hello there\n", add_special_tokens=False)

    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(TokenizeRequest("t", messages=HELLO))
        await peers.to_tokenizer.send(GenerateRequest("g", messages=HELLO))
        assert (await peers.next(peers.gateway)).token_ids == want
        assert (await peers.next(peers.scheduler)).prompt_token_ids == want

    run(tmp_path, body, images=False, chat_template=template)


def test_tokenizer_flag_loads_another_folder_with_its_template(tmp_path: Path) -> None:
    other = tmp_path / "other-tokenizer"
    other.mkdir()
    shutil.copy(tokenizer_dir() / "tokenizer.json", other / "tokenizer.json")
    config = json.loads((tokenizer_dir() / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}<{{ m.content }}>{% endfor %}"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    tok = TextTokenizer.load(str(other))

    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(TokenizeRequest("t", messages=HELLO))
        want = tok.encode("<Be brief.><Hello there>", add_special_tokens=False)
        assert (await peers.next(peers.gateway)).token_ids == want

    run(tmp_path, body, images=False, tokenizer=str(other))


BIG_TEXT = "the long grey road and the sea " * 13_000  # ~400k characters: ~0.4 s to encode


def said(rid: str, text: str) -> GenerateRequest:
    return GenerateRequest(rid, SamplingParams(), messages=[{"role": "user", "content": text}])


def test_a_huge_prompt_is_tokenized_aside_while_short_ones_go_on(tmp_path: Path) -> None:
    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(said("big", BIG_TEXT))
        await peers.to_tokenizer.send(chat("small", max_tokens=2))
        assert (await peers.next(peers.scheduler)).request_id == "small"
        err = await peers.next(peers.gateway)  # then the big one, over the context length
        assert err.request_id == "big" and "maximum context length" in err.error.message

    run(tmp_path, body)


def test_an_abort_ends_a_request_still_being_tokenized_aside(tmp_path: Path) -> None:
    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(said("gone", BIG_TEXT))
        await peers.to_tokenizer.send(AbortRequest("gone"))
        await peers.to_tokenizer.send(said("marker", BIG_TEXT))  # after "gone" on the worker
        err = await peers.next(peers.gateway)
        assert err.request_id == "marker"  # "gone" was dropped, not refused or sent on

    run(tmp_path, body)


def test_sdk_requests_meet_the_size_caps_before_tokenizing(tmp_path: Path) -> None:
    async def body(peers: Peers) -> None:
        await peers.to_tokenizer.send(GenerateRequest("long", SamplingParams(), prompt="x" * 101))
        many = [{"role": "user", "content": "hi"}] * 3
        await peers.to_tokenizer.send(GenerateRequest("many", SamplingParams(), messages=many))
        stops = SamplingParams(stop=["a"] * 65)
        await peers.to_tokenizer.send(GenerateRequest("stops", stops, prompt="hi"))
        errors = [await peers.next(peers.gateway) for _ in range(3)]
        assert [(e.request_id, e.error.param) for e in errors] == [
            ("long", "prompt"),
            ("many", "messages"),
            ("stops", "stop"),
        ]
        assert "--max-prompt-chars" in errors[0].error.message

    run(tmp_path, body, max_prompt_chars=100, max_messages=2)
