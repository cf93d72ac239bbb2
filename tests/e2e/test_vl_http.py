"""Qwen2.5-VL through HTTP with the official openai client: every image source the server
accepts, every source it must refuse (400 naming the problem), and service carrying on."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image

from tests.e2e.engine_process import EngineProcess
from tests.fixtures.vl_checkpoint import make_qwen2_5_vl_checkpoint


def png_bytes(w: int, h: int, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    (d / "allowed").mkdir()
    (d / "allowed" / "cat.png").write_bytes(png_bytes(64, 48, 1))
    (d / "secret.png").write_bytes(png_bytes(32, 32, 2))
    (d / "allowed" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return d


@pytest.fixture(scope="module")
def image_host(media_dir: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media_dir))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.fixture(scope="module")
def vl_server(tmp_path_factory: pytest.TempPathFactory, media_dir: Path) -> Iterator[EngineProcess]:
    ckpt = make_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("vl") / "tiny-vl")
    eng = EngineProcess(
        str(ckpt),
        [
            "--max-model-len",
            "1024",
            "--kv-cache-memory",
            str(32 << 20),
            "--threads",
            "1",
            "--served-model-name",
            "tiny-vl",
            "--allowed-local-media-path",
            str(media_dir / "allowed"),
            "--allowed-media-domains",
            "127.0.0.1",
        ],
    ).start(timeout=240)
    try:
        yield eng
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def open_vl_server(vl_server: EngineProcess) -> Iterator[EngineProcess]:
    """The same model with no --allowed-media-domains: any public host, no internal address."""
    model = vl_server.model
    eng = EngineProcess(
        model,
        [
            "--max-model-len",
            "1024",
            "--kv-cache-memory",
            str(16 << 20),
            "--threads",
            "1",
            "--served-model-name",
            "tiny-vl",
        ],
    ).start(240)
    try:
        yield eng
    finally:
        eng.stop()


def test_internal_addresses_are_refused_without_an_allow_list(
    open_vl_server: EngineProcess, image_host: str
) -> None:
    for url in [
        "http://10.1.2.3/cat.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/cat.png",
        f"{image_host}/allowed/cat.png",
        "file:///etc/passwd",
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            ask(open_vl_server, url)
        msg = str(err.value).lower()
        assert "address" in msg or "local files are not allowed" in msg, (url, msg)
    assert ask(open_vl_server, data_url(png_bytes(30, 30, 3))).usage.completion_tokens == 4


def ask(eng: EngineProcess, url: str, **kw):
    client = openai.OpenAI(base_url=eng.base_url, api_key="none", max_retries=0)
    return client.chat.completions.create(
        model="tiny-vl",
        temperature=0,
        **{"max_tokens": 4, **kw},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is in the picture?"},
                ],
            }
        ],
    )


def test_image_sources_are_accepted(
    vl_server: EngineProcess, media_dir: Path, image_host: str
) -> None:
    raw = (media_dir / "allowed" / "cat.png").read_bytes()
    answers = [
        ask(vl_server, data_url(raw)),
        ask(vl_server, str(media_dir / "allowed" / "cat.png")),
        ask(vl_server, "file://" + str(media_dir / "allowed" / "cat.png")),
        ask(vl_server, f"{image_host}/allowed/cat.png"),
    ]
    usage = {a.usage.prompt_tokens for a in answers}
    assert len(usage) == 1  # the same picture gives the same prompt, whatever its source
    texts = {a.choices[0].message.content for a in answers}
    assert len(texts) == 1  # greedy: the same answer too
    extra = answers[0].model_extra["tessera"]["images"][0]
    assert extra["original_size"] == [64, 48]
    assert extra["resized_size"][0] % 28 == 0 and extra["resized_size"][1] % 28 == 0
    # The second identical prompt reuses the KV of the first (image hash in the block hash).
    assert answers[1].usage.prompt_tokens_details.cached_tokens > 0


@pytest.mark.parametrize(
    "url, words",
    [
        ("http://example.com/cat.png", "allowed-media-domains"),
        ("http://localhost:9/cat.png", "allowed-media-domains"),
        ("/etc/passwd", "outside"),
        ("data:image/png;base64,@@@not-base64@@@", "base64"),
        ("data:image/png;base64," + base64.b64encode(b"garbage bytes").decode(), "decode"),
    ],
)
def test_refused_sources_get_400_naming_the_problem(
    vl_server: EngineProcess, url: str, words: str
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(vl_server, url)
    assert words in str(err.value).lower()


def test_more_refusals_then_service_continues(
    vl_server: EngineProcess, media_dir: Path, image_host: str
) -> None:
    for url, words in [
        (str(media_dir / "secret.png"), "outside"),
        (str(media_dir / "allowed" / "../secret.png"), "outside"),
        (f"{image_host}/allowed/corrupt.png", "decode"),
        (str(media_dir / "allowed" / "corrupt.png"), "decode"),
        (f"{image_host}/allowed/missing.png", "404"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            ask(vl_server, url)
        assert words in str(err.value).lower(), (url, str(err.value))
    big = Image.new("RGB", (9000, 9000))  # 81 Mpx: over the 64 Mpx cap, refused from its header
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(openai.BadRequestError) as err:
        ask(vl_server, data_url(buf.getvalue()))
    assert "more than the limit" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        ask(
            vl_server,
            data_url(png_bytes(40, 40, 5)),
            extra_body={"mm_processor_kwargs": {"max_pixels": 100, "min_pixels": 200}},
        )
    assert "pixels" in str(err.value).lower()
    ok = ask(vl_server, data_url(png_bytes(40, 40, 5)))
    assert ok.choices[0].finish_reason == "length"


def test_text_only_and_two_images(vl_server: EngineProcess) -> None:
    client = openai.OpenAI(base_url=vl_server.base_url, api_key="none")
    text = client.chat.completions.create(
        model="tiny-vl",
        max_tokens=3,
        temperature=0,
        messages=[{"role": "user", "content": "Hello"}],
    )
    assert text.usage is not None and text.usage.completion_tokens >= 1
    two = client.chat.completions.create(
        model="tiny-vl",
        max_tokens=3,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png_bytes(56, 56, 7))}},
                    {"type": "image_url", "image_url": {"url": data_url(png_bytes(84, 28, 8))}},
                    {"type": "text", "text": "Compare them."},
                ],
            }
        ],
    )
    assert two.model_extra is not None
    sizes = [im["original_size"] for im in two.model_extra["tessera"]["images"]]
    assert sizes == [[56, 56], [84, 28]]


def test_grounding_example_runs_against_the_server(
    vl_server: EngineProcess, media_dir: Path, tmp_path: Path
) -> None:
    import json
    import subprocess
    import sys

    from tests.e2e.engine_process import ROOT

    out_png = tmp_path / "boxes.png"
    run = subprocess.run(
        [
            sys.executable,
            "examples/ovd_grounding.py",
            "--image",
            str(media_dir / "allowed" / "cat.png"),
            "--labels",
            "cat,dog",
            "--base-url",
            vl_server.base_url,
            "--model",
            "tiny-vl",
            "--out",
            str(out_png),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["original_size"] == [64, 48]
    assert report["resized_size"][0] % 28 == 0
    assert out_png.exists() and Image.open(out_png).size == (64, 48)


def test_json_schema_answer_about_an_image(vl_server: EngineProcess) -> None:
    """Structured output with an image: a grounding-style box as schema-valid JSON."""
    import json

    schema = {
        "type": "object",
        "properties": {
            "label": {"enum": ["cat", "dog"]},
            "bbox_2d": {
                "type": "array",
                "items": {"enum": [0, 14, 28]},
                "minItems": 4,
                "maxItems": 4,
            },
        },
        "required": ["label", "bbox_2d"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "box", "schema": schema}}
    out = ask(vl_server, data_url(png_bytes(56, 56, 3)), response_format=fmt, max_tokens=40)
    value = json.loads(out.choices[0].message.content or "")
    assert value["label"] in ("cat", "dog") and len(value["bbox_2d"]) == 4


def test_server_maps_answer_boxes_to_the_original_image(vl_server: EngineProcess) -> None:
    """`"tessera": {"boxes": true}`: the answer's boxes in the original image's pixels, clipped;
    the answer is forced into the grounding format with a JSON schema, since the random model
    writes no boxes by itself."""
    import json

    item = {
        "type": "object",
        "properties": {
            "bbox_2d": {
                "type": "array",
                "items": {"enum": [0, 28, 56, 84]},
                "minItems": 4,
                "maxItems": 4,
            },
            "label": {"enum": ["cat"]},
        },
        "required": ["bbox_2d", "label"],
        "additionalProperties": False,
    }
    schema = {"type": "array", "items": item, "minItems": 1, "maxItems": 2}
    fmt = {"type": "json_schema", "json_schema": {"name": "boxes", "schema": schema}}
    url = data_url(png_bytes(100, 60, 5))  # resized to 112 x 56 for the model
    extra = {"tessera": {"boxes": True}}
    out = ask(vl_server, url, response_format=fmt, max_tokens=60, extra_body=extra)
    assert out.model_extra is not None
    tessera = out.model_extra["tessera"]
    (image,) = tessera["images"]
    rw, rh = image["resized_size"]
    assert image["original_size"] == [100, 60] and (rw, rh) != (100, 60)
    answer = json.loads(out.choices[0].message.content or "")
    (mapped,) = tessera["boxes"]
    assert mapped["image"] == 0 and len(mapped["boxes"]) == len(answer)
    for raw, box in zip(answer, mapped["boxes"], strict=True):
        x1, y1, x2, y2 = raw["bbox_2d"]
        xs = sorted(min(v * 100 / rw, 100) for v in (x1, x2))  # corners come back ordered
        ys = sorted(min(v * 60 / rh, 60) for v in (y1, y2))
        want = [xs[0], ys[0], xs[1], ys[1]]
        assert box["label"] == "cat"
        assert box["bbox_2d"] == pytest.approx([round(v, 2) for v in want], abs=0.01)
    client = openai.OpenAI(base_url=vl_server.base_url, api_key="none")
    messages: Any = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "Find the cat."},
            ],
        }
    ]
    stream_kw: Any = dict(response_format=fmt, extra_body=extra)
    stream = client.chat.completions.create(
        model="tiny-vl", temperature=0, max_tokens=60, stream=True, messages=messages, **stream_kw
    )
    finals = [c for c in stream if c.choices and c.choices[0].finish_reason]
    assert finals and finals[-1].model_extra is not None
    assert finals[-1].model_extra["tessera"]["boxes"][0]["image"] == 0
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="tiny-vl",
            max_tokens=2,
            extra_body=extra,
            messages=[{"role": "user", "content": "no picture here"}],
        )
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "tessera.boxes"
    with pytest.raises(openai.BadRequestError):
        ask(vl_server, url, extra_body={"tessera": {"boxes": True, "masks": True}})


def test_responses_api_takes_an_image(vl_server: EngineProcess) -> None:
    client = openai.OpenAI(base_url=vl_server.base_url, api_key="none")
    url = data_url(png_bytes(56, 56, 9))
    image_input: Any = [
        {
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": url},
                {"type": "input_text", "text": "What is in the picture?"},
            ],
        }
    ]
    resp = client.responses.create(
        model="tiny-vl", input=image_input, max_output_tokens=4, temperature=0
    )
    chat = ask(vl_server, url)
    assert resp.output_text == chat.choices[0].message.content
    assert resp.usage is not None and chat.usage is not None
    assert resp.usage.input_tokens == chat.usage.prompt_tokens  # the image tokens counted
