"""The paged KV block pool: a free list in LRU order, reference counts, and the prefix cache.

Blocks live in the executor's device memory; this pool only decides which block ids a request
owns. A freed block keeps its hash and stays reusable until it is evicted from the LRU front.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def block_hash(parent: bytes | None, token_ids: Sequence[int], extra: Sequence[str] = ()) -> bytes:
    """Chain hash of one full block: parent hash, its token ids, and image content hashes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(array("q", token_ids).tobytes())
    for key in extra:
        h.update(b"|img:" + key.encode())
    return h.digest()


class BlockPool:
    """Allocation, reference counting and O(1) LRU eviction of cached free blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.ref_count = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        # Free blocks, least recently freed first; a cached free block is evicted from the front.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.queries = 0
        self.hits = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks if self.num_blocks else 0.0

    def lookup(self, h: bytes) -> int | None:
        return self.cached.get(h) if self.enable_caching else None

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            old = self.hash_of[block]
            if old is not None:  # evict from the prefix cache
                if self.cached.get(old) == block:
                    del self.cached[old]
                self.hash_of[block] = None
            self.ref_count[block] = 1
            out.append(block)
        return out

    def share(self, block: int) -> None:
        """Take a reference on a cached block (a prefix-cache hit)."""
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference on each block; tail blocks first so they are evicted first."""
        for block in reversed(blocks):
            self.ref_count[block] -= 1
            if self.ref_count[block] < 0:
                raise RuntimeError(f"KV block {block} released twice")
            if self.ref_count[block] == 0:
                if self.hash_of[block] is None:
                    self.free[block] = None
                    self.free.move_to_end(block, last=False)  # uncached: reuse first
                else:
                    self.free[block] = None

    def mark_cached(self, block: int, h: bytes) -> None:
        """Register a block that just became full under its chain hash."""
        if not self.enable_caching or self.hash_of[block] is not None:
            return
        if h not in self.cached:
            self.cached[h] = block
            self.hash_of[block] = h

    def record_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        self.queries += queried_tokens
        self.hits += hit_tokens

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
