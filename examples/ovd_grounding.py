"""Open-vocabulary detection against a Tessera server: ask for boxes, draw them on the image.

Example client of the OpenAI HTTP adapter; boxes are mapped back with `tessera.images` sizes.
It needs a server running a grounding VLM (Qwen2.5-VL, or a fine-tune such as
VLM-R1-Qwen2.5VL-3B-OVD). After scripts/install.sh has made .venv, from the repository root:

    scripts/serve.sh --model /path/to/Qwen2.5-VL-3B-Instruct &     # wait for "Tessera ready"
    .venv/bin/python examples/ovd_grounding.py --image photo.jpg --labels person,dog --out boxes.png

(--base-url defaults to http://127.0.0.1:8000/v1, --model to the server's first model name.)

The raw model answer goes to stderr, the parsed boxes (original-image pixels) to stdout as JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.image_processing import smart_resize  # noqa: E402
from protocols.grounding import (  # noqa: E402
    Box,
    draw_boxes,
    ovd_prompt,
    parse_boxes,
    scale_boxes,
)

if TYPE_CHECKING:
    from PIL import Image

# Qwen2-VL / Qwen2.5-VL processor defaults (preprocessor_config.json of the released models).
QWEN_FACTOR = 28  # patch size 14 x spatial merge 2
QWEN_MIN_PIXELS = 56 * 56  # 3136
QWEN_MAX_PIXELS = 14 * 14 * 4 * 16384  # 12845056


def resized_size(width: int, height: int) -> tuple[int, int]:
    """The (width, height) the Qwen2-VL processor resizes to with the released models' defaults;
    used only when the server's response does not say which size the model saw."""
    h, w = smart_resize(height, width, QWEN_FACTOR, QWEN_MIN_PIXELS, QWEN_MAX_PIXELS)
    return w, h


def load_image(source: str) -> tuple[Image.Image, bytes]:
    """The image at a local path or http(s) URL, decoded, with its raw bytes."""
    from PIL import Image

    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=30) as resp:
            data = resp.read()
    else:
        with open(source, "rb") as f:
            data = f.read()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image, data


def image_url(source: str, image: Image.Image | None, data: bytes | None) -> str:
    """What the request carries: an http(s) URL as-is, anything else as a base64 data URL."""
    if source.startswith(("http://", "https://")):
        return source
    from PIL import Image

    assert image is not None and data is not None
    mime = Image.MIME.get(image.format or "", "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def tessera_sizes(response: Any) -> tuple[list[int], list[int]] | None:
    """(resized_size, original_size) of the first image from the response's `tessera` field."""
    extra = getattr(response, "model_extra", None) or {}
    meta = extra.get("tessera")
    if meta is None and hasattr(response, "to_dict"):
        meta = response.to_dict().get("tessera")
    if not isinstance(meta, dict):
        return None
    try:
        first = meta["images"][0]
        resized = [int(v) for v in first["resized_size"]]
        original = [int(v) for v in first["original_size"]]
    except (TypeError, KeyError, IndexError, ValueError):
        return None
    if len(resized) != 2 or len(original) != 2:
        return None
    return resized, original


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--image", required=True, help="local path or http(s) URL of the image")
    parser.add_argument(
        "--labels", required=True, help="comma-separated object names, e.g. person,dog"
    )
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI base URL")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument("--out", default="boxes.png", help="where to save the annotated PNG")
    parser.add_argument("--api-key", default="EMPTY", help="API key, if the server wants one")
    parser.add_argument("--prompt", default=None, help="override the OVD prompt ({labels} filled)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from openai import OpenAI

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if not labels:
        print("--labels names no object", file=sys.stderr)
        return 2

    image: Image.Image | None = None
    data: bytes | None = None
    try:
        image, data = load_image(args.image)
    except Exception as exc:  # an http(s) image can still be sent; the server fetches it
        if not args.image.startswith(("http://", "https://")):
            print(f"cannot read image {args.image}: {exc}", file=sys.stderr)
            return 2
        print(
            f"warning: cannot fetch {args.image} here ({exc}); boxes stay unscaled", file=sys.stderr
        )

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    prompt = args.prompt.format(labels=", ".join(labels)) if args.prompt else ovd_prompt(labels)
    response = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url(args.image, image, data)}},
                    {"type": "text", "text": prompt},
                ],
            }
        ],
        temperature=0.0,
        max_tokens=512,
    )
    answer = response.choices[0].message.content or ""
    print("--- raw answer ---", file=sys.stderr)
    print(answer, file=sys.stderr)

    boxes: list[Box] = parse_boxes(answer)
    sizes = tessera_sizes(response)
    if sizes is None and image is not None:
        original = list(image.size)
        sizes = (list(resized_size(*image.size)), original)
        print(
            "note: no tessera.images in the response; sizes from local smart_resize",
            file=sys.stderr,
        )
    if sizes is not None:
        resized, original = sizes
        boxes = scale_boxes(boxes, resized, original)

    if image is not None:
        draw_boxes(image, boxes, args.out)
        print(f"saved {args.out}", file=sys.stderr)
    result = {
        "resized_size": sizes[0] if sizes else None,
        "original_size": sizes[1] if sizes else None,
        "boxes": [box.to_dict() for box in boxes],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
