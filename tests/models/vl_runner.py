"""Qwen2.5-VL requests for the test scheduler in paged_runner: image refs found in the prompt, and
pixels sent apart from the request, as the image stage does; run by the product ModelRunner."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from core.codec import Buffer
from devices import Platform
from models.qwen2_5_vl import Qwen2_5_VLModel
from protocols.messages import EngineRequest, ImagePixels, ImageRef
from tests.models.paged_runner import greedy_request, paged_runner, run_plans


@dataclass
class VLPrompt:
    """A prompt with its placeholders expanded, and each image's pixel patches and grid."""

    ids: list[int]
    images: list[tuple[torch.Tensor, tuple[int, int, int]]] = field(default_factory=list)


def vl_request(
    request_id: str, prompt: VLPrompt, max_new_tokens: int, image_token_id: int, merge: int = 2
) -> tuple[EngineRequest, list[ImagePixels]]:
    """A greedy EngineRequest whose ImageRefs cover each image's placeholder run, and the
    ImagePixels the image stage would send for it (keyed by a hash of the pixels)."""
    request = greedy_request(request_id, prompt.ids, max_new_tokens)
    pixels = []
    cursor = 0
    for values, grid in prompt.images:
        offset = prompt.ids.index(image_token_id, cursor)
        length = grid[0] * grid[1] * grid[2] // (merge * merge)
        cursor = offset + length
        array = np.ascontiguousarray(values.numpy(), dtype=np.float32)
        digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
        request.images.append(ImageRef(digest, offset, length, list(grid)))
        buffer = Buffer("float32", list(array.shape), array.tobytes())
        pixels.append(ImagePixels(request_id, digest, list(grid), buffer))
    return request, pixels


def vl_greedy_generate(
    model: Qwen2_5_VLModel,
    prompts: list[VLPrompt],
    max_new_tokens: int,
    block_size: int = 4,
    prefill_chunk: int | None = None,
    platform: Platform | None = None,
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Runs all prompts together; returns per prompt (greedy output ids, prompt logits [L, V]).

    With prefill_chunk a chunk boundary may cut an image's placeholder run."""
    image_token_id = model.config.image_token_id
    assert image_token_id is not None
    requests, pixels = [], {}
    for i, prompt in enumerate(prompts):
        request, pixels[f"r{i}"] = vl_request(f"r{i}", prompt, max_new_tokens, image_token_id)
        requests.append(request)
    blocks = sum(-(-(len(p.ids) + max_new_tokens) // block_size) for p in prompts)
    runner = paged_runner(model, blocks, block_size, platform=platform)
    jobs = run_plans(runner, requests, max_new_tokens, prefill_chunk, pixels)
    return [j.output for j in jobs], [torch.cat(j.prompt_logits) for j in jobs]
