"""Pure-torch model code: config, layers, paged attention, the Llama/Qwen2 decoder, loaders.

The names below are re-exported lazily, so the tokenizer and detokenizer stages (which use
models.tokenizer / models.detokenizer) never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AttentionMetadata": "models.attention",
    "allocate_kv_cache": "models.attention",
    "kv_cache_bytes_per_block": "models.attention",
    "ModelConfig": "models.config",
    "Decoder": "models.decoder",
    "load_model": "models.loader",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
