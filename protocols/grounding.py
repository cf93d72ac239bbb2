"""Grounding helpers: parse bounding boxes out of a VLM answer, map them to the original image.

Client side of the last hop: a chat completion's text plus its `tessera.images` sizes -> boxes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

OVD_PROMPT = (
    "Please carefully check the image and detect the following objects: [{labels}]. "
    "Output each detected target's bbox coordinates in JSON format. The format of the bbox "
    'coordinates is: ```json\n[{{"bbox_2d": [x1, y1, x2, y2], "label": "target name"}}, '
    '{{"bbox_2d": [x1, y1, x2, y2], "label": "target name"}}]\n```. '
    "If there are no such targets in the image, simply respond with None."
)

_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.IGNORECASE | re.DOTALL)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
# A fenced block, optionally tagged json; an unclosed fence (truncated output) runs to the end.
_FENCE = re.compile(r"```[ \t]*(?:json\b)?(.*?)(?:```|\Z)", re.IGNORECASE | re.DOTALL)
_BOX_KEYS = ("bbox_2d", "bbox")
_SCORE_KEYS = ("score", "confidence")
_MAX_DEPTH = 8

# Distinct, readable on light and dark photos; a label keeps its colour within one drawing.
_PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
)


@dataclass
class Box:
    """One detected object: corners in some image frame (x1 <= x2, y1 <= y2), pixels."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float | None = None

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    def to_dict(self) -> dict[str, Any]:
        """The box in the models' own JSON shape, plus `score` when there is one."""
        out: dict[str, Any] = {"bbox_2d": [self.x1, self.y1, self.x2, self.y2], "label": self.label}
        if self.score is not None:
            out["score"] = self.score
        return out


def ovd_prompt(labels: Sequence[str]) -> str:
    """The VLM-R1 open-vocabulary-detection seed prompt for `labels` (each quoted, comma-joined)."""
    joined = ", ".join(json.dumps(label, ensure_ascii=False) for label in labels)
    return OVD_PROMPT.format(labels=joined)


def extract_answer(text: str) -> str:
    """The model's answer: inside the last `<answer>` tag (closed or not), else the text unthought.

    Without an answer tag, `<think>...</think>` blocks are removed; a stray `</think>` (the template
    opened the thought) keeps only what follows it, and an unclosed `<think>` drops the rest.
    """
    if not isinstance(text, str):
        return ""
    opens = list(_ANSWER_OPEN.finditer(text))
    if opens:
        start = opens[-1].end()
        close = _ANSWER_CLOSE.search(text, start)
        return text[start : close.start() if close else len(text)].strip()
    text = _THINK_BLOCK.sub("", text)
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:
        text = text[closes[-1].end() :]
    dangling = _THINK_OPEN.search(text)
    if dangling:
        text = text[: dangling.start()]
    return text.strip()


def parse_boxes(text: str) -> list[Box]:
    """Every box in a model's answer; [] for "None", empty or unparseable text. Never raises.

    Looks in fenced ```json blocks first, else at the first JSON array/object of the answer.
    Items carry `bbox_2d` or `bbox` (4 numbers) and an optional `label`; a single object, a dict
    wrapping a list, trailing commas and a truncated last item are all accepted.
    """
    try:
        answer = extract_answer(text)
        blocks = [m.group(1) for m in _FENCE.finditer(answer)]
        boxes = [box for block in blocks for box in _boxes_in(block)]
        if not boxes and blocks:
            boxes = _boxes_in(_FENCE.sub(" ", answer))
        if not boxes and not blocks:
            boxes = _boxes_in(answer)
        return boxes
    except Exception:  # model output must never take the caller down
        return []


def scale_boxes(
    boxes: Iterable[Box], resized_size: Sequence[float], original_size: Sequence[float]
) -> list[Box]:
    """Map boxes from the resized frame the model saw to the original image, clipped to it.

    Sizes are (width, height). A box wholly outside the frame comes back with zero width or height.
    """
    rw, rh = resized_size
    ow, oh = original_size
    if min(rw, rh, ow, oh) <= 0:
        raise ValueError(f"image sizes must be positive: {resized_size} -> {original_size}")
    sx, sy = ow / rw, oh / rh
    return [
        replace(
            box,
            x1=_clip(box.x1 * sx, ow),
            y1=_clip(box.y1 * sy, oh),
            x2=_clip(box.x2 * sx, ow),
            y2=_clip(box.y2 * sy, oh),
        )
        for box in boxes
    ]


def draw_boxes(image: Image.Image, boxes: Iterable[Box], out_path: str | Path) -> Image.Image:
    """Draw each box and its label on a copy of `image` and save it as PNG at `out_path`."""
    from PIL import ImageDraw, ImageFont

    canvas = image.convert("RGB")  # always a copy
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line = max(2, round(min(canvas.size) / 300))
    colours: dict[str, tuple[int, int, int]] = {}
    for box in boxes:
        colour = colours.setdefault(box.label, _PALETTE[len(colours) % len(_PALETTE)])
        draw.rectangle((box.x1, box.y1, box.x2, box.y2), outline=colour, width=line)
        caption = box.label if box.score is None else f"{box.label} {box.score:.2f}"
        if not caption:
            continue
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        tw, th = right - left + 4, bottom - top + 4
        ty = box.y1 - th if box.y1 - th >= 0 else box.y1  # above the box, else just inside it
        draw.rectangle((box.x1, ty, box.x1 + tw, ty + th), fill=colour)
        draw.text((box.x1 + 2 - left, ty + 2 - top), caption, fill=_ink_on(colour), font=font)
    canvas.save(out_path, format="PNG")
    return canvas


def _clip(value: float, limit: float) -> float:
    return min(max(value, 0.0), float(limit))


def _ink_on(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _boxes_in(text: str) -> list[Box]:
    """Boxes in a stretch of text: the JSON at its first bracket, else every complete object."""
    starts = [i for i in (text.find("["), text.find("{")) if i >= 0]
    if not starts:
        return []
    cleaned = _drop_trailing_commas(text[min(starts) :])
    try:
        value, _ = json.JSONDecoder().raw_decode(cleaned)
    except (ValueError, RecursionError):
        value = None
    boxes = _collect(value, 0) if value is not None else []
    return boxes or _salvage_objects(cleaned)


def _salvage_objects(text: str) -> list[Box]:
    """Boxes from each balanced `{...}` that parses, outermost first: survives truncation."""
    boxes: list[Box] = []
    covered_to = -1
    for start, end in _object_spans(text):
        if start < covered_to:
            continue  # inside an object already taken as a box
        try:
            value = json.loads(text[start : end + 1])
        except (ValueError, RecursionError):
            continue
        box = _to_box(value) if isinstance(value, dict) else None
        if box is not None:
            boxes.append(box)
            covered_to = end
    return boxes


def _scan(text: str) -> Iterator[tuple[int, str, bool]]:
    """(index, char, outside a JSON string) for every char; quotes count as inside."""
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            yield i, ch, False
        elif ch == '"':
            in_string = True
            yield i, ch, False
        else:
            yield i, ch, True


def _object_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every balanced brace pair outside strings, sorted by start."""
    spans: list[tuple[int, int]] = []
    stack: list[int] = []
    for i, ch, outside in _scan(text):
        if outside and ch == "{":
            stack.append(i)
        elif outside and ch == "}" and stack:
            spans.append((stack.pop(), i))
    spans.sort()
    return spans


def _drop_trailing_commas(text: str) -> str:
    """Remove commas (outside strings) that only whitespace separates from `]`, `}` or the end."""
    out: list[str] = []
    n = len(text)
    for i, ch, outside in _scan(text):
        if outside and ch == ",":
            j = i + 1
            while j < n and text[j] in " \t\r\n":
                j += 1
            if j == n or text[j] in "]}":
                continue
        out.append(ch)
    return "".join(out)


def _collect(value: Any, depth: int) -> list[Box]:
    """Boxes in a parsed JSON value: a box object, a list of them, or a dict wrapping either."""
    if depth > _MAX_DEPTH:
        return []
    if isinstance(value, dict):
        box = _to_box(value)
        if box is not None:
            return [box]
        return [
            b for v in value.values() if isinstance(v, list | dict) for b in _collect(v, depth + 1)
        ]
    if isinstance(value, list):
        return [b for item in value for b in _collect(item, depth + 1)]
    return []


def _to_box(item: dict[str, Any]) -> Box | None:
    """One item as a Box with ordered corners, or None when it has no usable 4-number bbox."""
    raw = next((item[k] for k in _BOX_KEYS if k in item), None)
    if isinstance(raw, list) and len(raw) == 2 and all(isinstance(p, list) for p in raw):
        raw = [*raw[0], *raw[1]]  # [[x1, y1], [x2, y2]]
    if not isinstance(raw, list) or len(raw) != 4:
        return None
    coords = [_number(v) for v in raw]
    if any(c is None for c in coords):
        return None
    x1, y1, x2, y2 = (float(c) for c in coords)  # type: ignore[arg-type]
    label = item.get("label")
    label = "" if label is None else label if isinstance(label, str) else str(label)
    score = next((s for k in _SCORE_KEYS if (s := _number(item.get(k))) is not None), None)
    return Box(label, min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), score)


def _number(value: Any) -> float | None:
    """A finite number from an int, float or numeric string; None otherwise (bools included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def boxes_per_image(text: str, images: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server's `tessera.boxes`: the answer's boxes mapped, for each image of the request
    (`tessera.images` entries with resized_size and original_size, both (width, height)), from
    the frame the model saw to that image's pixels, clipped to it. Never raises."""
    boxes = parse_boxes(text)
    out = []
    for i, image in enumerate(images):
        try:
            mapped = scale_boxes(boxes, image["resized_size"], image["original_size"])
        except (KeyError, TypeError, ValueError):
            mapped = []
        out.append(
            {
                "image": i,
                "boxes": [
                    {
                        "label": b.label,
                        "bbox_2d": [round(v, 2) for v in (b.x1, b.y1, b.x2, b.y2)],
                        **({"score": b.score} if b.score is not None else {}),
                    }
                    for b in mapped
                ],
            }
        )
    return out
