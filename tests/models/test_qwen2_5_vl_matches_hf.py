"""Our Qwen2.5-VL (vision tower, M-RoPE, paged decoder) vs transformers on a tiny random checkpoint.
Image features close, 3D positions exact, greedy ids exact (batched, chunked), flat and nested."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from devices.cpu import CpuPlatform
from models import load_model
from models.mrope import mrope_positions
from models.qwen2_5_vl import Qwen2_5_VLModel
from tests.fixtures.vl_checkpoint import IMAGE_TOKEN_ID, make_qwen2_5_vl_checkpoint
from tests.models.vl_runner import VLPrompt, vl_greedy_generate

torch.set_num_threads(2)

MAX_NEW = 8
# (height, width) of random RGB images: 168x252 spans 2x3 attention windows.
CASES: dict[str, tuple[str, list[tuple[int, int]]]] = {
    "one_image": ("Describe this picture.", [(168, 252)]),
    "two_images": ("What differs between these two?", [(56, 84), (112, 56)]),
    "text_only": ("Name three prime numbers.", []),
}


@dataclass
class Case:
    prompt: VLPrompt
    hf_inputs: dict[str, torch.Tensor]


@pytest.fixture(scope="module", params=["flat", "nested"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    nested = request.param == "nested"
    return make_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp(request.param), nested=nested)


@pytest.fixture(scope="module")
def hf_model(checkpoint: Path) -> Any:
    cls = transformers.Qwen2_5_VLForConditionalGeneration
    return cls.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> Qwen2_5_VLModel:
    loaded = load_model(str(checkpoint), torch.device("cpu"), torch.float32)
    assert isinstance(loaded, Qwen2_5_VLModel)
    CpuPlatform().prepare_model(loaded)  # as the runner serves it: linears packed for oneDNN
    return loaded


@pytest.fixture(scope="module")
def cases(checkpoint: Path) -> dict[str, Case]:
    """Chat-templated prompts with each <|image_pad|> expanded to the image's token count."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    rng = np.random.default_rng(0)
    out = {}
    for name, (text, sizes) in CASES.items():
        content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": text}]
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids = tokenizer(rendered)["input_ids"]
        images = []
        for h, w in sizes:
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            batch = processor(images=[Image.fromarray(pixels)], return_tensors="pt")
            images.append((batch["pixel_values"], tuple(batch["image_grid_thw"][0].tolist())))
        expanded: list[int] = []
        pending = iter(images)
        for tok in ids:
            if tok == IMAGE_TOKEN_ID:
                t, h, w = next(pending)[1]
                expanded += [IMAGE_TOKEN_ID] * (t * h * w // 4)
            else:
                expanded.append(tok)
        input_ids = torch.tensor([expanded])
        hf_inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == IMAGE_TOKEN_ID).int(),
        }
        if images:
            hf_inputs["pixel_values"] = torch.cat([p for p, _ in images])
            hf_inputs["image_grid_thw"] = torch.tensor([g for _, g in images])
        out[name] = Case(VLPrompt(expanded, images), hf_inputs)
    return out


@pytest.fixture(scope="module")
def reference(hf_model: Any, cases: dict[str, Case]) -> dict[str, tuple[list[int], torch.Tensor]]:
    """transformers' greedy continuation and prompt logits, one prompt at a time."""
    ref = {}
    with torch.no_grad():
        for name, case in cases.items():
            out = hf_model.generate(**case.hf_inputs, max_new_tokens=MAX_NEW, do_sample=False)
            logits = hf_model(**case.hf_inputs).logits[0].float()
            ref[name] = (out[0, case.hf_inputs["input_ids"].shape[1] :].tolist(), logits)
    return ref


def test_encode_image_matches_hf_visual(
    model: Qwen2_5_VLModel, hf_model: Any, cases: dict[str, Case]
) -> None:
    for case in cases.values():
        for pixels, grid in case.prompt.images:
            with torch.no_grad():
                theirs = hf_model.model.visual(pixels, grid_thw=torch.tensor([grid])).pooler_output
                ours = model.encode_image(pixels, grid)
            assert ours.shape == (grid[0] * grid[1] * grid[2] // 4, model.config.hidden_size)
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_mrope_positions_match_hf_get_rope_index(hf_model: Any, cases: dict[str, Case]) -> None:
    for name, case in cases.items():
        inputs = case.hf_inputs
        theirs, their_delta = hf_model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
        )
        grids = [grid for _, grid in case.prompt.images]
        ours, delta = mrope_positions(case.prompt.ids, grids, IMAGE_TOKEN_ID, 2)
        np.testing.assert_array_equal(ours, theirs[:, 0].numpy(), err_msg=name)
        assert delta == int(their_delta), name
        assert (delta == 0) == (name == "text_only")


@pytest.mark.parametrize("names", [["one_image"], ["two_images"], ["text_only"], sorted(CASES)])
def test_paged_greedy_matches_hf(
    model: Qwen2_5_VLModel,
    cases: dict[str, Case],
    reference: dict[str, tuple[list[int], torch.Tensor]],
    names: list[str],
) -> None:
    ours, our_logits = vl_greedy_generate(model, [cases[n].prompt for n in names], MAX_NEW)
    for name, mine, logits in zip(names, ours, our_logits, strict=True):
        theirs, their_logits = reference[name]
        assert mine[: len(theirs)] == theirs, name  # HF stops at EOS
        torch.testing.assert_close(logits, their_logits, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_splitting_images_matches_hf(
    model: Qwen2_5_VLModel,
    cases: dict[str, Case],
    reference: dict[str, tuple[list[int], torch.Tensor]],
) -> None:
    names = sorted(CASES)
    prompts = [cases[n].prompt for n in names]
    # With 5-token chunks every image's placeholder run crosses at least one chunk boundary.
    ours, our_logits = vl_greedy_generate(model, prompts, MAX_NEW, prefill_chunk=5)
    for name, mine, logits in zip(names, ours, our_logits, strict=True):
        theirs, their_logits = reference[name]
        assert mine[: len(theirs)] == theirs, name
        torch.testing.assert_close(logits, their_logits, atol=1e-4, rtol=1e-4)
