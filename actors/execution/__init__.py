"""The executor's model-running parts, free of sockets and actors: the ModelRunner and what it keeps.

actors/executor.py (the stage) feeds it step plans and image pixels; nothing here does I/O.
"""

from __future__ import annotations

from actors.execution.kv_pool import KVLimits, KVPool, size_kv_pool
from actors.execution.model_runner import ModelRunner

__all__ = ["KVLimits", "KVPool", "ModelRunner", "size_kv_pool"]
