"""Qwen2-VL image preprocessing must equal transformers' Qwen2VLImageProcessorPil exactly.

Real photographs from scikit-image and synthetic odd cases, each run through both processors.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as qwen_pil

from models.image_processing import (
    ImageProcessorConfig,
    ProcessedImage,
    preprocess_image,
    smart_resize,
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _write_config(folder: Path, **overrides: object) -> Path:
    raw = {
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor",
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(raw))
    return folder


@pytest.fixture(scope="module", params=["default", "small"])
def processors(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "small":
        _write_config(folder, max_pixels=64 * 28 * 28)
    else:
        _write_config(folder)
    hf = qwen_pil.Qwen2VLImageProcessorPil.from_pretrained(str(folder))
    return hf, ImageProcessorConfig.load(str(folder))


def _assert_same(hf, cfg: ImageProcessorConfig, image: Image.Image, **kwargs: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = hf(image, return_tensors="np", **kwargs)
    out = preprocess_image(image, cfg, **kwargs)
    assert isinstance(out, ProcessedImage)
    assert out.pixel_values.dtype == np.float32
    assert out.pixel_values.shape == ref["pixel_values"].shape
    assert np.array_equal(out.pixel_values, ref["pixel_values"])
    assert [list(out.grid_thw)] == ref["image_grid_thw"].tolist()
    t, h, w = out.grid_thw
    assert out.num_tokens == t * h * w // cfg.merge_size**2
    assert out.resized_size == (w * cfg.patch_size, h * cfg.patch_size)
    assert out.original_size == image.size


def _photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)())


def _noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "CMYK": 4}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=mode)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket", "camera"])
def test_photographs_match_hf(processors, name):
    hf, cfg = processors
    _assert_same(hf, cfg, _photo(name))


@pytest.mark.parametrize(
    "size", [(1, 1), (10, 10), (2000, 30), (30, 1500), (333, 517), (1800, 1200)]
)
def test_odd_sizes_match_hf(processors, size):
    hf, cfg = processors
    width, height = size
    _assert_same(hf, cfg, _noise(width, height, seed=width))


def test_tiny_image_is_upscaled_to_min_pixels(processors):
    _, cfg = processors
    out = preprocess_image(_noise(10, 10), cfg)
    assert out.resized_size == (56, 56)
    assert out.grid_thw == (1, 4, 4)
    assert out.num_tokens == 4


def _transparent_rgba() -> Image.Image:
    image = _noise(97, 61, "RGBA", seed=3)
    alpha = np.tile(np.linspace(0, 255, 97, dtype=np.uint8), (61, 1))
    image.putalpha(Image.fromarray(alpha))
    return image


def _palette_with_transparency() -> Image.Image:
    image = _photo("chelsea").convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    "make",
    [
        lambda: _photo("camera"),
        lambda: _noise(120, 80, "L"),
        _transparent_rgba,
        lambda: _transparent_rgba().convert("LA"),
        lambda: _noise(90, 70, "CMYK", seed=4),
        lambda: _photo("coffee").convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        _palette_with_transparency,
        lambda: _photo("camera").convert("1"),
    ],
    ids=["camera-L", "noise-L", "RGBA", "LA", "CMYK", "P", "P-transparency", "1-bit"],
)
def test_modes_match_hf(processors, make):
    hf, cfg = processors
    _assert_same(hf, cfg, make())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_pixels": 256 * 28 * 28},
        {"max_pixels": 32 * 28 * 28},
        {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28},
        {"min_pixels": 1024 * 28 * 28, "max_pixels": 1024 * 28 * 28},
    ],
)
def test_per_request_pixel_overrides_match_hf(processors, kwargs):
    hf, cfg = processors
    if kwargs.get("max_pixels", cfg.max_pixels) < kwargs.get("min_pixels", cfg.min_pixels):
        with pytest.raises(ValueError, match="must not exceed"):  # HF does not validate this
            preprocess_image(_photo("astronaut"), cfg, **kwargs)
        return
    _assert_same(hf, cfg, _photo("astronaut"), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"min_pixels": 0}, {"max_pixels": -1}, {"min_pixels": 5000, "max_pixels": 4000}],
)
def test_invalid_pixel_overrides_raise(kwargs):
    with pytest.raises(ValueError):
        preprocess_image(_noise(64, 64), ImageProcessorConfig(), **kwargs)


def test_absurd_aspect_ratio_raises_like_hf():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010, 28, 3136, 12845056)
    with pytest.raises(ValueError, match="aspect ratio"):
        qwen_pil.smart_resize(10, 2010, 28, 3136, 12845056)


@pytest.mark.parametrize("hw", [(1, 1), (28, 28), (517, 333), (30, 2000), (4000, 3000)])
def test_smart_resize_matches_hf(hw):
    for min_px, max_px in [(3136, 12845056), (3136, 64 * 784), (100 * 784, 100 * 784)]:
        h, w = hw
        ours = smart_resize(h, w, 28, min_px, max_px)
        assert ours == qwen_pil.smart_resize(h, w, 28, min_px, max_px)


def test_config_reads_size_keys_of_newer_files(tmp_path):
    folder = _write_config(tmp_path, size={"shortest_edge": 1000, "longest_edge": 200000})
    raw = json.loads((folder / "preprocessor_config.json").read_text())
    del raw["min_pixels"], raw["max_pixels"]
    (folder / "preprocessor_config.json").write_text(json.dumps(raw))
    cfg = ImageProcessorConfig.load(str(folder))
    assert (cfg.min_pixels, cfg.max_pixels) == (1000, 200000)
    hf = qwen_pil.Qwen2VLImageProcessorPil.from_pretrained(str(folder))
    _assert_same(hf, cfg, _photo("rocket"))


def test_module_does_not_import_torch():
    import subprocess

    code = "import models.image_processing, sys; assert 'torch' not in sys.modules"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)


def test_8bit_images_ship_as_uint8_with_a_table_that_reproduces_the_inputs(processors) -> None:
    """What the image stage sends for an RGB photograph: a quarter of the float32 bytes, and the
    executor's device lookup (actors/execution/pixel_store.py) gives HF's values bit for bit."""
    import torch

    from actors.execution.pixel_store import input_values

    hf, cfg = processors
    out = preprocess_image(Image.fromarray(skdata.astronaut()), cfg)
    assert out.patches.dtype == np.uint8 and out.value_table is not None
    assert out.value_table.shape == (3, 256) and out.value_table.dtype == np.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = hf(Image.fromarray(skdata.astronaut()), return_tensors="np")["pixel_values"]
    values = input_values(torch.from_numpy(out.patches), torch.from_numpy(out.value_table))
    assert values.dtype == torch.float32
    assert np.array_equal(values.numpy(), ref)


def test_images_that_are_not_8bit_ship_as_float32(processors) -> None:
    _, cfg = processors
    grey16 = Image.fromarray((np.arange(64 * 64, dtype=np.float32).reshape(64, 64) * 3.0), "F")
    cfg16 = dataclasses.replace(cfg, do_convert_rgb=False)
    out = preprocess_image(grey16, cfg16)
    assert out.value_table is None and out.patches.dtype == np.float32
