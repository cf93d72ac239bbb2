"""Vision-encoder outputs by image content hash, LRU within a byte cap (the model runner's).
An image is encoded once even when its placeholder tokens span prefill chunks or requests."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

ENCODER_CACHE_BYTES = 512 << 20


class EncoderCache:
    def __init__(self, max_bytes: int = ENCODER_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.encoded = 0  # encoder runs so far

    def get(self, key: str, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached output for `key`, or `encode()`'s, kept; evicts least recently used."""
        return self.get_many([key], lambda keys: [encode()])[key]

    def get_many(
        self, keys: list[str], encode: Callable[[list[str]], list[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """Outputs for every key; the missing ones are encoded together in one `encode` call."""
        missing = list(dict.fromkeys(k for k in keys if k not in self.entries))
        found = {k: self.entries[k] for k in keys if k in self.entries}
        for k in found:
            self.entries.move_to_end(k)
        if missing:
            values = encode(missing)
            self.encoded += len(missing)
            for k, value in zip(missing, values, strict=True):
                found[k] = value
                self.entries[k] = value
                self.bytes += value.numel() * value.element_size()
            while self.bytes > self.max_bytes and len(self.entries) > len(missing):
                _, old = self.entries.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()
        return found
