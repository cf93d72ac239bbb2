"""Pure-torch model code: config, layers, paged attention, the Llama/Qwen2 decoder, loaders.
The executor imports only the names below; nothing here knows about actors or sockets."""

from __future__ import annotations

from models.attention import AttentionMetadata, allocate_kv_cache, kv_cache_bytes_per_block
from models.config import ModelConfig
from models.decoder import Decoder
from models.loader import load_model

__all__ = [
    "AttentionMetadata",
    "Decoder",
    "ModelConfig",
    "allocate_kv_cache",
    "kv_cache_bytes_per_block",
    "load_model",
]
