"""Sampling defaults from a checkpoint's generation_config.json, chosen by `--generation-config`.

Read once by the HTTP actor at start; `convert` gives each sampling field a request leaves unset
the file's value (vLLM's rule), else Tessera's default.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.cli_values import GENERATION_CONFIG_FILE
from core.config import EngineConfig

# The generation_config.json keys applied as request defaults (vLLM's list; HF and OpenAI agree on
# the names). `do_sample` is ignored, as vLLM ignores it: temperature alone decides.
INT_FIELDS = ("top_k",)
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty")


def generation_config_path(config: EngineConfig) -> Path | None:
    """The file `--generation-config` names: auto = the model folder's (a .gguf carries none),
    vllm = none, else the given folder's."""
    source = config.generation_config
    if source == "vllm":
        return None
    folder = Path(config.model if source == "auto" else source)
    return folder / GENERATION_CONFIG_FILE if folder.is_dir() else None


def sampling_defaults(config: EngineConfig) -> dict[str, Any]:
    """The sampling values the file sets (absent and null keys are left out); {} without a file.
    A file that is no JSON object, or a value of the wrong type, raises ValueError."""
    path = generation_config_path(config)
    if path is None or not path.is_file():
        if config.generation_config not in ("auto", "vllm"):
            raise ValueError(f"--generation-config: no {GENERATION_CONFIG_FILE} in {path}")
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object")
    defaults: dict[str, Any] = {}
    for name in INT_FIELDS + FLOAT_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        kinds = (int,) if name in INT_FIELDS else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{path}: {name} must be a number, got {value!r}")
        defaults[name] = value if name in INT_FIELDS else float(value)
    return defaults
