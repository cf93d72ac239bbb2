"""The model runner's encoder-output cache: one encode per image content hash, LRU within a byte cap."""

from __future__ import annotations

import torch

from actors.execution.encoder_cache import EncoderCache


def test_an_image_is_encoded_once_and_evicted_least_recently_used_first() -> None:
    calls: list[str] = []

    def encoder(key: str, rows: int = 4):
        def run() -> torch.Tensor:
            calls.append(key)
            return torch.zeros(rows, 8)  # 128 bytes

        return run

    cache = EncoderCache(max_bytes=300)
    a = cache.get("a", encoder("a"))
    assert cache.get("a", encoder("a")) is a  # second chunk of the same image: no re-encode
    cache.get("b", encoder("b"))
    cache.get("a", encoder("a"))  # "a" becomes most recent
    cache.get("c", encoder("c"))  # over 300 bytes: evicts "b", the least recently used
    assert calls == ["a", "b", "c"]
    cache.get("a", encoder("a"))
    cache.get("b", encoder("b"))
    assert calls == ["a", "b", "c", "b"]
    assert cache.bytes <= 300 and cache.encoded == 4
