"""Image fetching and decoding: data URLs, local-path allow-list, SSRF rules, limits, modes.

Remote cases use a real http.server on 127.0.0.1, reachable only when allow-listed.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import image_transforms

from actors.media import (
    MediaError,
    MediaPolicy,
    content_hash,
    decode_image,
    load_image,
)


def _png(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save)
    return buf.getvalue()


def _photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _load(source: str, policy: MediaPolicy | None = None) -> tuple[Image.Image, bytes]:
    return asyncio.run(load_image(source, policy or MediaPolicy()))


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# --- data URLs and decoding -------------------------------------------------------------------


def test_data_url_png_round_trip():
    image = _photo()
    png = _png(image)
    out, raw = _load(_data_url(png))
    assert raw == png
    assert out.mode == "RGB" and out.size == image.size
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_data_url_jpeg_round_trip():
    buf = io.BytesIO()
    _photo().save(buf, "JPEG", quality=90)
    out, raw = _load(_data_url(buf.getvalue(), "image/jpeg"))
    assert raw == buf.getvalue()
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))


def test_data_url_with_non_image_mime_still_decodes():
    out, _ = _load(_data_url(_png(_photo()), "application/octet-stream"))
    assert out.size == (64, 48)


def test_bad_base64_is_refused():
    with pytest.raises(MediaError, match="invalid base64 image data"):
        _load("data:image/png;base64,@@@not-base64@@@")


@pytest.mark.parametrize("data", [b"definitely not an image", b""])
def test_corrupt_bytes_are_refused(data):
    with pytest.raises(MediaError, match="cannot decode image") as caught:
        _load(_data_url(data))
    assert "object at" not in str(caught.value) and "0x" not in str(caught.value)


@pytest.mark.parametrize("fmt", ["PPM", "TGA"])
def test_formats_outside_allow_list_are_refused(fmt):
    buf = io.BytesIO()
    _photo().save(buf, fmt)
    with pytest.raises(MediaError, match="cannot decode image"):
        decode_image(buf.getvalue(), 64_000_000)


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "BMP", "TIFF"])
def test_common_formats_decode(fmt):
    buf = io.BytesIO()
    _photo().save(buf, fmt)
    assert decode_image(buf.getvalue(), 64_000_000).size == (64, 48)


def test_truncated_png_is_refused():
    png = _png(_photo(256, 256))
    with pytest.raises(MediaError, match="cannot decode image"):
        decode_image(png[: len(png) // 2], 64_000_000)


def test_data_url_over_max_bytes_is_refused():
    with pytest.raises(MediaError, match="exceeds 100 bytes"):
        _load(_data_url(_png(_photo())), MediaPolicy(max_bytes=100))


@pytest.mark.parametrize("size", [(100_000, 100_000), (5000, 5000)])
def test_pixel_bomb_is_refused_from_header(size):
    bomb = _png_claiming(*size)
    assert len(bomb) < 200
    with pytest.raises(MediaError, match="pixels"):
        decode_image(bomb, 1_000_000)
    with pytest.raises(MediaError, match="pixels"):
        _load(_data_url(bomb), MediaPolicy(max_pixels=1_000_000))


def test_exif_rotated_jpeg_comes_out_upright():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue(), 64_000_000)
    assert out.size == (20, 40)
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def _rgba() -> Image.Image:
    arr = np.asarray(_photo(32, 16, seed=1))
    alpha = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 1))
    return Image.fromarray(np.dstack([arr, alpha]), "RGBA")


def _palette_transparent() -> Image.Image:
    image = _photo(32, 16, seed=2).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    return image


def _jpeg_cmyk() -> bytes:
    buf = io.BytesIO()
    _photo(32, 16, seed=3).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "encoded",
    [
        lambda: _png(_rgba()),
        lambda: _png(_rgba().convert("LA")),
        lambda: _png(_palette_transparent(), transparency=0),
        lambda: _png(_photo(32, 16).convert("P")),
        lambda: _png(_photo(32, 16).convert("L")),
        lambda: _png(_photo(32, 16).convert("1")),
        lambda: _png(Image.fromarray(np.arange(512, dtype=np.uint16).reshape(16, 32) * 128)),
        _jpeg_cmyk,
    ],
    ids=["RGBA", "LA", "P-transparency", "P", "L", "1-bit", "I;16", "CMYK"],
)
def test_modes_become_rgb_like_transformers(encoded):
    data = encoded()
    out = decode_image(data, 64_000_000)
    assert out.mode == "RGB"
    expected = image_transforms.convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
    assert isinstance(expected, np.ndarray)
    assert np.array_equal(np.asarray(out), expected)


def test_transparent_pixels_composite_onto_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    out = decode_image(_png(image), 64_000_000)
    assert np.all(np.asarray(out) == 255)


def test_content_hash_ignores_encoding_but_not_pixels():
    image = _photo()
    a = decode_image(_png(image, compress_level=1), 64_000_000)
    b = decode_image(_png(image, compress_level=9, optimize=True), 64_000_000)
    assert _png(image, compress_level=1) != _png(image, compress_level=9, optimize=True)
    assert content_hash(a) == content_hash(b)
    changed = image.copy()
    changed.putpixel((0, 0), (1, 2, 3) if image.getpixel((0, 0)) != (1, 2, 3) else (4, 5, 6))
    assert content_hash(decode_image(_png(changed), 64_000_000)) != content_hash(a)
    assert content_hash(image.resize((48, 64))) != content_hash(image)


# --- local files ------------------------------------------------------------------------------


@pytest.fixture
def media_dirs(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "cat.png").write_bytes(_png(_photo()))
    (outside / "secret.png").write_bytes(_png(_photo(seed=9)))
    return allowed, outside


def test_local_file_inside_allowed_path_loads(media_dirs):
    allowed, _ = media_dirs
    policy = MediaPolicy(allowed_local_media_path=str(allowed))
    for source in (str(allowed / "cat.png"), (allowed / "cat.png").as_uri()):
        out, raw = _load(source, policy)
        assert out.size == (64, 48) and raw == (allowed / "cat.png").read_bytes()


def test_local_file_refused_without_allowed_path(media_dirs):
    allowed, _ = media_dirs
    with pytest.raises(MediaError, match="--allowed-local-media-path"):
        _load(str(allowed / "cat.png"))


def test_local_file_outside_allowed_path_is_refused(media_dirs):
    allowed, outside = media_dirs
    policy = MediaPolicy(allowed_local_media_path=str(allowed))
    for source in (str(outside / "secret.png"), f"{allowed}/../outside/secret.png"):
        with pytest.raises(MediaError, match="outside the allowed media path"):
            _load(source, policy)


def test_symlink_escaping_allowed_path_is_refused(media_dirs):
    allowed, outside = media_dirs
    os.symlink(outside / "secret.png", allowed / "link.png")
    os.symlink(outside, allowed / "linkdir")
    policy = MediaPolicy(allowed_local_media_path=str(allowed))
    for source in (allowed / "link.png", allowed / "linkdir" / "secret.png"):
        with pytest.raises(MediaError, match="outside the allowed media path"):
            _load(str(source), policy)


def test_missing_or_non_file_local_path_is_refused(media_dirs):
    allowed, _ = media_dirs
    (allowed / "sub").mkdir()
    policy = MediaPolicy(allowed_local_media_path=str(allowed))
    for source in (allowed / "nope.png", allowed / "sub"):
        with pytest.raises(MediaError, match="not a readable regular file"):
            _load(str(source), policy)


@pytest.mark.parametrize("source", ["cat.png", "ftp://example.com/a.png", "gopher://x/"])
def test_unsupported_sources_are_refused(source):
    with pytest.raises(MediaError):
        _load(source, MediaPolicy(allowed_local_media_path="/"))


# --- remote -----------------------------------------------------------------------------------
