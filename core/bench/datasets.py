"""Prompt builders: ``random`` (text of about N tokens) and ``random_vl`` (the same text plus K
random W x H images as ``data:`` URLs).

Text is a random sequence of common English words, different for every request (so no two
prompts share a prefix beyond the chat template). With a tokenizer (a folder holding
``tokenizer.json``, read with the ``tokenizers`` package) the text is cut to exactly N tokens of
that tokenizer (re-tokenizing the decoded text can differ by a token or two at the cut); without
one it is N words, which most BPE vocabularies encode as about one token each. Images are uniform
RGB noise, encoded as JPEG (default) or PNG, one distinct image per request and slot.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DATASETS = ("random", "random_vl")

# Short, common words: one token each (with their leading space) in GPT-2/Qwen-style BPE.
WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an they "
    "which one you were all her she there would their we him been has when who will no more if "
    "out so up said what its about than into them can only other time new some could these two "
    "may first then do any like my now over such our man me even most made after also did many "
    "off before must well back through years much where your way down should because long each "
    "just state people those too how little good world very still own see men work house last "
    "day place great right three old year same under take part end light open small water "
    "city road river tree stone green red blue white black cold warm early late high low near "
    "far north south east west morning night table window door paper book letter music story "
    "game team field market price power energy report number group order point line side hand"
).split()


@dataclass
class Prompt:
    """One request's input: user text and image URLs (empty for text-only)."""

    text: str
    images: list[str] = field(default_factory=list)


def load_tokenizer(path: str | None) -> Any:
    """A ``tokenizers.Tokenizer`` from PATH/tokenizer.json (or PATH itself), or None."""
    if not path:
        return None
    from tokenizers import Tokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SystemExit(f"--tokenizer: no tokenizer.json at {path}")
    return Tokenizer.from_file(file)


def random_text(n_tokens: int, rng: np.random.Generator, tokenizer: Any = None) -> str:
    """About N tokens of random words: exactly N tokenizer ids when a tokenizer is given."""
    if n_tokens <= 0:
        return ""
    if tokenizer is None:
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_tokens))
    n_words = n_tokens + 8
    while True:
        text = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) >= n_tokens:
            return tokenizer.decode(ids[:n_tokens])
        n_words *= 2


def count_tokens(text: str, tokenizer: Any = None) -> int:
    """Tokens of TEXT by the tokenizer, or its word count without one."""
    if tokenizer is None:
        return len(text.split())
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


def random_image_data_url(
    width: int, height: int, rng: np.random.Generator, fmt: str = "jpeg"
) -> str:
    """A ``data:image/...;base64,`` URL of a random-noise RGB image of WIDTH x HEIGHT."""
    from PIL import Image

    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
    else:
        Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=90)
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_prompts(
    dataset: str,
    n: int,
    prompt_tokens: int,
    rng: np.random.Generator,
    tokenizer: Any = None,
    image_num: int = 1,
    image_width: int = 640,
    image_height: int = 640,
    image_format: str = "jpeg",
) -> list[Prompt]:
    """N prompts of DATASET (``random`` or ``random_vl``)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r} (have {', '.join(DATASETS)})")
    prompts = []
    for _ in range(n):
        text = random_text(prompt_tokens, rng, tokenizer)
        images = []
        if dataset == "random_vl":
            images = [
                random_image_data_url(image_width, image_height, rng, image_format)
                for _ in range(image_num)
            ]
        prompts.append(Prompt(text, images))
    return prompts
