"""Value types of the command line: vLLM-style sizes (`32k`, `1K`), JSON flags, chat templates and
the generation config source; core/cli.py's parser turns each flag's text into its config value."""

from __future__ import annotations

import argparse
import json
import os
import re
from decimal import Decimal
from typing import Any

_DECIMAL_SUFFIX = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SUFFIX = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


BUILT_IN_DEVICES = ("auto", "cpu", "cuda", "npu", "tpu")  # devices/__init__.py's backends
DEVICE_PLUGIN_GROUP = "tessera.platforms"  # devices.ENTRY_POINT_GROUP, read without torch


def device_name(text: str) -> str:
    """--device: a built-in backend or an installed plug-in's entry-point name (not loaded here:
    the executor loads it, so the launcher never imports torch)."""
    from importlib.metadata import entry_points

    key = text.strip().lower()
    plugins = sorted(ep.name for ep in entry_points(group=DEVICE_PLUGIN_GROUP))
    if key in BUILT_IN_DEVICES or key in plugins:
        return key
    names = ", ".join([*BUILT_IN_DEVICES, *plugins])
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; expected one of {names}")


def human_readable_int(text: str) -> int:
    """An integer as vLLM's flags write it: "4096", "32k" = 32000 and "25.6k" = 25600 (decimal
    suffixes k m g t), "32K" = 32768 (binary suffixes K M G T, whole numbers only)."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT])", value)
    if match is None:
        try:
            return int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid integer {text!r} (write e.g. 4096, 32k = 32000 or 32K = 32768)"
            ) from None
    number, suffix = match.groups()
    if suffix in _DECIMAL_SUFFIX:
        return int(Decimal(number) * _DECIMAL_SUFFIX[suffix])
    if "." in number:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a binary suffix ({suffix}) takes a whole number; "
            f"did you mean {number}{suffix.lower()}?"
        )
    return int(number) * _BINARY_SUFFIX[suffix]


def modality_limits(text: str) -> dict[str, int]:
    """--limit-mm-per-prompt: JSON such as '{"image": 2}' (or vLLM's older 'image=2,video=1')."""
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError:
        pairs = [item.split("=", 1) for item in text.split(",")]
        raw = {k: v for k, v in (p for p in pairs if len(p) == 2)} if "=" in text else None
    if not isinstance(raw, dict) or not raw:
        raise argparse.ArgumentTypeError(f'expected JSON like {{"image": 2}}, got {text!r}')
    limits: dict[str, int] = {}
    for modality, count in raw.items():
        name = str(modality).strip()
        try:
            limits[name] = int(str(count).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"the limit for {name!r} must be an integer, got {count!r}"
            ) from None
        if limits[name] < 0:
            raise argparse.ArgumentTypeError(f"the limit for {name!r} must be >= 0")
    return limits


def json_string_list(text: str) -> list[str]:
    """--allowed-origins: a JSON list of strings, as vLLM takes it ('["https://a.example"]')."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise argparse.ArgumentTypeError(f"expected a JSON list of strings, got {text!r}")
    return value


GENERATION_CONFIG_FILE = "generation_config.json"


def generation_config_source(text: str) -> str:
    """--generation-config: "auto" (the model folder's file), "vllm" (no file: vLLM's own
    defaults) or a folder holding generation_config.json."""
    if text in ("auto", "vllm"):
        return text
    if not os.path.isfile(os.path.join(text, GENERATION_CONFIG_FILE)):
        raise argparse.ArgumentTypeError(
            f"expected auto, vllm or a folder holding {GENERATION_CONFIG_FILE}, got {text!r}"
        )
    return text


_TEMPLATE_CHARS = "{}\n"


def load_chat_template(value: str) -> str:
    """--chat-template: a file's text, or the value itself when it is an inline template (it
    holds template characters; escapes such as \\n in it are decoded, as vLLM does)."""
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if not any(c in value for c in _TEMPLATE_CHARS):
        raise ValueError(f"--chat-template {value!r}: no such file, and not an inline template")
    return value.encode("latin-1", "backslashreplace").decode("unicode_escape")


# ---------------------------------------------------------------- the parser
