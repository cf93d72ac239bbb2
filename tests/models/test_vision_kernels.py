"""The vision tower with its elementwise steps compiled (what CpuPlatform.compile gives the
model runner) encodes images as the eager tower and transformers' do, in fp32 and bf16."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from devices.cpu import CpuPlatform
from models import load_model
from models.qwen2_5_vl import Qwen2_5_VLModel
from models.vision_kernels import rms_norm
from tests.fixtures.vl_checkpoint import make_qwen2_5_vl_checkpoint

GRIDS = [(1, 12, 18), (1, 4, 6)]  # two windows sizes, one image smaller than a window
PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("vision_kernels"))


def _encode(model: Qwen2_5_VLModel, dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    images = [(torch.randn(t * h * w, PATCH_DIM).to(dtype), (t, h, w)) for t, h, w in GRIDS]
    with torch.no_grad():
        return model.encode_images(images)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_vision_steps_match_eager_and_hf(
    checkpoint: Path, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TESSERA_COMPILE", "1")  # the suite runs eagerly (tests/conftest.py)
    model = load_model(str(checkpoint), torch.device("cpu"), dtype)
    assert isinstance(model, Qwen2_5_VLModel)
    eager = _encode(model, dtype)
    model.visual.use_compiler(CpuPlatform().compile)
    assert model.visual.kernels.rms_norm is not rms_norm  # compiled, not the plain function
    compiled = _encode(model, dtype)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, ref in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol)
    if dtype == torch.float32:
        hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            checkpoint, dtype=torch.float32
        ).eval()
        torch.manual_seed(0)
        pixels = torch.cat([torch.randn(t * h * w, PATCH_DIM) for t, h, w in GRIDS])
        with torch.no_grad():
            theirs = hf.model.visual(pixels, grid_thw=torch.tensor(GRIDS)).pooler_output
        expected = theirs.split([t * h * w // 4 for t, h, w in GRIDS])
        for got, ref in zip(compiled, expected, strict=True):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
