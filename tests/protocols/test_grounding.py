"""Unit tests of the grounding helpers on fixed model answers, with no server or model.

Covers the client end of the grounding path: answer text -> boxes -> original frame -> drawing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from PIL import Image
from skimage import data as skdata

from protocols.grounding import (
    Box,
    draw_boxes,
    extract_answer,
    ovd_prompt,
    parse_boxes,
    scale_boxes,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ovd_grounding.py"

TWO = (
    '[{"bbox_2d": [10, 20, 110, 220], "label": "dog"}, '
    '{"bbox_2d": [5, 6, 7, 8], "label": "person"}]'
)
EXPECTED_TWO = [Box("dog", 10, 20, 110, 220), Box("person", 5, 6, 7, 8)]


def test_think_answer_and_fenced_json_yield_the_answer_boxes():
    text = (
        '<think>A dog at [1, 2, 3, 4]? {"bbox_2d": [0, 0, 1, 1], "label": "x"}</think>\n'
        f"<answer>```json\n{TWO}\n```</answer>"
    )
    assert parse_boxes(text) == EXPECTED_TWO


def test_bare_fenced_json():
    assert parse_boxes(f"```json\n{TWO}\n```") == EXPECTED_TWO


def test_fence_without_language_tag_and_prose_around_it():
    assert parse_boxes(f"Here you go:\n```\n{TWO}\n```\nDone.") == EXPECTED_TWO


def test_json_without_fence_after_prose_with_brackets():
    assert parse_boxes(f"I found [2] objects: {TWO} in total.") == EXPECTED_TWO


def test_single_object_instead_of_list():
    text = '```json\n{"bbox_2d": [1, 2, 3, 4], "label": "cat"}\n```'
    assert parse_boxes(text) == [Box("cat", 1, 2, 3, 4)]


def test_bbox_key_missing_label_and_score():
    text = '[{"bbox": [1.5, 2, 3, 4], "score": 0.9}, {"bbox_2d": ["5", "6", "7", "8"], "label": 3}]'
    assert parse_boxes(text) == [Box("", 1.5, 2, 3, 4, 0.9), Box("3", 5, 6, 7, 8)]


def test_dict_wrapping_a_list():
    text = f'```json\n{{"objects": {TWO}}}\n```'
    assert parse_boxes(text) == EXPECTED_TWO


def test_trailing_commas_are_tolerated():
    text = (
        '```json\n[{"bbox_2d": [1, 2, 3, 4,], "label": "a",}, '
        '{"bbox_2d": [5, 6, 7, 8], "label": "b"},]\n```'
    )
    assert parse_boxes(text) == [Box("a", 1, 2, 3, 4), Box("b", 5, 6, 7, 8)]


def test_truncated_last_item_keeps_the_complete_ones():
    text = (
        '<answer>```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, '
        '{"bbox_2d": [5, 6, 7, 8], "label": "b, {c}"}, {"bbox_2d": [9, 10'
    )
    assert parse_boxes(text) == [Box("a", 1, 2, 3, 4), Box("b, {c}", 5, 6, 7, 8)]


def test_truncated_wrapper_dict_keeps_the_complete_items():
    text = '{"objects": [{"bbox_2d": [1, 2, 3, 4], "label": "a", "attrs": {"c": 1}}, {"bbox_2d": [5'
    assert parse_boxes(text) == [Box("a", 1, 2, 3, 4)]


@pytest.mark.parametrize(
    "text",
    [
        "None",
        "<think>nothing there</think><answer>None</answer>",
        "```json\nNone\n```",
        "",
        "   ",
        "[",
        "{{{{",
        "]]]}}}",
        "[1, 2, 3]",
        '[{"bbox_2d": [1, 2, 3], "label": "short"}]',
        '[{"bbox_2d": [1, 2, "x", 4], "label": "nan"}]',
        '[{"bbox_2d": [1, 2, NaN, 4], "label": "nan"}]',
        '[{"bbox_2d": [true, 2, 3, 4], "label": "bool"}]',
        '{"label": "no box"}',
        "[" * 100_000,
        'lorem ipsum ```json {"bbox_2d": oops} ``` dolor',
    ],
)
def test_none_empty_and_garbage_give_no_boxes(text):
    assert parse_boxes(text) == []


def test_non_string_input_gives_no_boxes():
    assert parse_boxes(None) == []  # type: ignore[arg-type]


def test_swapped_corners_are_put_in_order():
    text = '[{"bbox_2d": [110, 220, 10, 20], "label": "dog"}]'
    assert parse_boxes(text) == [Box("dog", 10, 20, 110, 220)]


def test_extract_answer_variants():
    assert extract_answer("<think>t</think><answer> a </answer>") == "a"
    assert extract_answer("<answer>first</answer><answer>last</answer>") == "last"
    assert extract_answer("<think>t</think><answer>cut off") == "cut off"
    assert extract_answer("<think>t</think> plain ") == "plain"
    assert extract_answer("thought only in template</think>tail") == "tail"
    assert extract_answer("head<think>never closed") == "head"
    assert extract_answer("no tags at all") == "no tags at all"


def test_scale_boxes_maps_resized_frame_to_original():
    boxes = [Box("a", 0, 0, 644, 476), Box("b", 322, 238, 483, 357, 0.5)]
    scaled = scale_boxes(boxes, (644, 476), (1280, 946))
    assert scaled[0] == Box("a", 0, 0, 1280, 946)
    assert scaled[1].label == "b" and scaled[1].score == 0.5
    assert scaled[1].x1 == pytest.approx(640)
    assert scaled[1].y1 == pytest.approx(473)
    assert scaled[1].x2 == pytest.approx(960)
    assert scaled[1].y2 == pytest.approx(709.5)


def test_scale_boxes_clips_to_the_original_frame():
    boxes = [Box("over", -10, -5, 700, 500), Box("outside", 650, 480, 700, 500)]
    scaled = scale_boxes(boxes, (644, 476), (1280, 946))
    assert scaled[0] == Box("over", 0, 0, 1280, 946)
    assert scaled[1] == Box("outside", 1280, 946, 1280, 946)
    assert scaled[1].width == 0 and scaled[1].height == 0


def test_scale_boxes_rejects_empty_sizes():
    with pytest.raises(ValueError):
        scale_boxes([], (0, 476), (1280, 946))


def test_ovd_prompt_matches_the_vlm_r1_seed():
    prompt = ovd_prompt(["person", "dog"])
    assert prompt.startswith(
        'Please carefully check the image and detect the following objects: ["person", "dog"]. '
    )
    assert '```json\n[{"bbox_2d": [x1, y1, x2, y2], "label": "target name"}, ' in prompt
    assert prompt.endswith("If there are no such targets in the image, simply respond with None.")


def test_draw_boxes_writes_png_of_original_size_with_box_edges(tmp_path):
    image = Image.new("RGB", (320, 240), (255, 255, 255))
    out = tmp_path / "boxes.png"
    boxes = [Box("dog", 40, 60, 200, 180), Box("person", 10, 10, 100, 100, 0.75)]
    draw_boxes(image, boxes, out)
    saved = Image.open(out)
    assert saved.format == "PNG"
    assert saved.size == (320, 240)
    rgb = saved.convert("RGB")
    assert rgb.getpixel((120, 180)) != (255, 255, 255)  # bottom edge of "dog"
    assert rgb.getpixel((200, 120)) != (255, 255, 255)  # right edge of "dog"
    assert rgb.getpixel((300, 220)) == (255, 255, 255)  # far from every box
    assert rgb.getpixel((120, 180)) != rgb.getpixel((100, 50))  # labels get distinct colours
    assert image.getpixel((120, 180)) == (255, 255, 255)  # the input is left untouched


def test_draw_boxes_on_a_photo(tmp_path):
    photo = Image.fromarray(skdata.astronaut())
    out = tmp_path / "astronaut.png"
    draw_boxes(photo, parse_boxes('[{"bbox_2d": [150, 20, 320, 220], "label": "face"}]'), out)
    saved = Image.open(out).convert("RGB")
    assert saved.size == photo.size
    assert saved.getpixel((235, 220)) != photo.convert("RGB").getpixel((235, 220))


def test_example_help_runs():
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--labels" in proc.stdout and "--base-url" in proc.stdout


def _fake_openai_server(answer: str, tessera: dict | None) -> HTTPServer:
    """A one-route stand-in for the HTTP adapter that answers every chat with `answer`."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            length = int(self.headers.get("content-length", 0))
            request = json.loads(self.rfile.read(length))
            content = request["messages"][0]["content"]
            assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
            body = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": request["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
            }
            if tessera is not None:
                body["tessera"] = tessera
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize(
    ("tessera", "expected"),
    [
        # the server says what the model saw: 644x476 -> 1280x946 doubles (x) and ~1.987 (y)
        (
            {"images": [{"original_size": [1280, 946], "resized_size": [644, 476]}]},
            [0.0, 0.0, 640.0, pytest.approx(473.0)],
        ),
        # no tessera field: local smart_resize of 1280x946 is 1288x952
        (None, [0.0, 0.0, pytest.approx(320.0), pytest.approx(236.5)]),
    ],
)
def test_example_end_to_end_against_a_fake_server(tmp_path, tessera, expected):
    Image.new("RGB", (1280, 946), (255, 255, 255)).save(tmp_path / "in.png")
    answer = (
        "<think>hm</think><answer>"
        '```json\n[{"bbox_2d": [0, 0, 322, 238], "label": "dog"}]\n```</answer>'
    )
    server = _fake_openai_server(answer, tessera)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                str(EXAMPLE),
                "--image",
                str(tmp_path / "in.png"),
                "--labels",
                "dog,person",
                "--model",
                "m",
                "--base-url",
                f"http://127.0.0.1:{server.server_port}/v1",
                "--out",
                str(tmp_path / "out.png"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    assert "<answer>" in proc.stderr  # the raw answer is shown
    result = json.loads(proc.stdout)
    assert result["original_size"] == [1280, 946]
    assert [b["label"] for b in result["boxes"]] == ["dog"]
    assert result["boxes"][0]["bbox_2d"] == expected
    assert Image.open(tmp_path / "out.png").size == (1280, 946)
