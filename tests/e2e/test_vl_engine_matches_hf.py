"""Qwen2.5-VL through the whole engine (real processes, sockets, the image stage) gives the
greedy tokens of transformers' Qwen2_5_VLForConditionalGeneration, and the prompt token count of
its processor, whatever the scheduling: a mixed batch, image tokens split across prefill chunks,
prefix caching with shared and different images, and preemption."""

from __future__ import annotations

import base64
import io
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from protocols.client import EngineClient
from protocols.messages import GenerateRequest, SamplingParams
from tests.e2e.engine_process import EngineProcess
from tests.fixtures.vl_checkpoint import IMAGE_TOKEN_ID, make_qwen2_5_vl_checkpoint

NEW = 6
CASES: dict[str, tuple[str, list[int]]] = {  # text, image seeds (each image a random picture)
    "one_image": ("Describe this picture.", [1]),
    "two_images": ("What differs between these two?", [2, 3]),
    "text_only": ("Name three prime numbers.", []),
    "other_image": ("Describe this picture.", [4]),  # same text as one_image, new image
}
SIZES = {1: (168, 252), 2: (56, 84), 3: (112, 56), 4: (168, 252)}  # (height, width)


def picture(seed: int) -> Image.Image:
    h, w = SIZES[seed]
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("vlm") / "vl")


def hf_reference(ckpt: Path, names: list[str], new: int) -> dict[str, tuple[list[int], int]]:
    """transformers: greedy ids and prompt length, one prompt at a time."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    proc = Qwen2VLImageProcessorPil.from_pretrained(ckpt)
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32
    ).eval()
    out = {}
    for name in names:
        text, seeds = CASES[name]
        content = [{"type": "image"} for _ in seeds] + [{"type": "text", "text": text}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(rendered)["input_ids"]
        kw: dict[str, Any] = {}
        if seeds:
            batch = proc(images=[picture(s) for s in seeds], return_tensors="pt")
            kw = {"pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
            grids = iter(batch["image_grid_thw"].tolist())
            ids = [
                t
                for i in ids
                for t in ([i] * (np.prod(next(grids)) // 4) if i == IMAGE_TOKEN_ID else [i])
            ]
        input_ids = torch.tensor([ids])
        with torch.no_grad():
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                mm_token_type_ids=(input_ids == IMAGE_TOKEN_ID).int(),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                **kw,
            )
        out[name] = (gen[0, len(ids) :].tolist(), len(ids))
    return out


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> dict[str, tuple[list[int], int]]:
    return hf_reference(ckpt, list(CASES), NEW)


def request(name: str, new: int = NEW) -> GenerateRequest:
    text, seeds = CASES[name]
    content = [{"type": "image_url", "image_url": {"url": data_url(picture(s))}} for s in seeds]
    return GenerateRequest(
        request_id=f"{name}-{uuid.uuid4().hex[:8]}",
        messages=[{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
        sampling=SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True),
    )


def run(
    ckpt: Path, args: list[str], waves: list[list[str]], new: int = NEW
) -> tuple[list[list[Any]], str]:
    eng = EngineProcess(
        str(ckpt), ["--max-model-len", "512", "--threads", "1", *args], http=False
    ).start(240)
    try:
        with EngineClient(eng.front) as client:
            client.wait_ready(60)
            results = [client.complete_many([request(n, new) for n in wave]) for wave in waves]
        return results, eng.log()
    finally:
        eng.stop()


def check(wave: list[str], outs: list[Any], reference: dict) -> None:
    for name, out in zip(wave, outs):
        assert not isinstance(out, Exception), out
        assert out.token_ids == reference[name][0], name
        assert out.prompt_tokens == reference[name][1], name


def test_mixed_batch_matches_transformers(ckpt: Path, reference: dict) -> None:
    wave = ["one_image", "two_images", "text_only", "other_image"]
    (outs,), _ = run(ckpt, ["--kv-cache-memory", str(16 << 20)], [wave])
    check(wave, outs, reference)


def test_chunks_split_images_and_prefix_cache_keys_on_the_image(
    ckpt: Path, reference: dict
) -> None:
    waves = [["one_image"], ["one_image"], ["other_image"], ["two_images", "text_only"]]
    results, _ = run(
        ckpt, ["--kv-cache-memory", str(16 << 20), "--max-num-batched-tokens", "16"], waves
    )
    for wave, outs in zip(waves, results):
        check(wave, outs, reference)
    first, again, other = results[0][0], results[1][0], results[2][0]
    assert first.cached_tokens == 0
    assert again.cached_tokens >= 48  # every full block, the image's included
    # Same text, other picture: only blocks wholly before the image placeholders may match
    # (here the image starts inside the first block, so none do).
    assert other.cached_tokens < 16


def test_preemption_with_images_matches_transformers(ckpt: Path) -> None:
    # 40 new tokens keep requests alive long enough to overlap, and two "one_image" requests
    # (79 + 40 tokens = 8 blocks each) cannot both fit in 12 blocks: one must be preempted.
    new = 40
    reference = hf_reference(ckpt, ["one_image", "two_images"], new)
    wave = ["one_image", "two_images", "one_image", "two_images"]
    # bytes per block: 2 layers x (k, v) x 16 tokens x 2 kv heads x 16 dims x 4 bytes = 8 KiB.
    args = [
        "--kv-cache-memory",
        str(12 * 8192),
        "--max-model-len",
        "160",
        "--max-num-batched-tokens",
        "32",
    ]
    (outs,), log = run(ckpt, args, [wave], new)
    check(wave, outs, reference)
    assert "preempted" in log
