"""Batched vision encoding: several images of different sizes in one pass give exactly what
transformers' vision tower gives for the same batch, and what one-at-a-time encoding gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from models import load_model
from models.qwen2_5_vl import Qwen2_5_VLModel
from tests.fixtures.vl_checkpoint import make_qwen2_5_vl_checkpoint

GRIDS = [(1, 12, 18), (1, 4, 6), (1, 8, 4)]  # 168x252 (2x3 windows), 56x84, 112x56 patches


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("vision"))


def test_batched_images_match_hf_and_single_encodes(checkpoint: Path) -> None:
    torch.manual_seed(0)
    ours = load_model(str(checkpoint), torch.device("cpu"), torch.float32)
    assert isinstance(ours, Qwen2_5_VLModel)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        checkpoint, dtype=torch.float32
    ).eval()
    patch_dim = 3 * 2 * 14 * 14
    images = [(torch.randn(t * h * w, patch_dim), (t, h, w)) for t, h, w in GRIDS]
    with torch.no_grad():
        batched = ours.encode_images(images)
        singles = [ours.encode_image(p, g) for p, g in images]
        theirs = hf.model.visual(
            torch.cat([p for p, _ in images]), grid_thw=torch.tensor(GRIDS)
        ).pooler_output
    expected = theirs.split([t * h * w // 4 for t, h, w in GRIDS])
    for got, single, ref in zip(batched, singles, expected, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got, single, atol=1e-5, rtol=1e-5)
