"""Preprocessed image pixels on an executor rank, by content hash, held by the requests using them.
Filled from the image stage's ImagePixels; released when a plan lists the request as finished."""

from __future__ import annotations

import numpy as np
import torch

from core.codec import Buffer
from protocols.messages import ImagePixels


def buffer_tensor(buf: Buffer) -> torch.Tensor:
    """A wire Buffer as a torch tensor (copied: received frames are read-only)."""
    arr = np.frombuffer(buf.data, dtype=np.dtype(buf.dtype)).reshape(buf.shape)
    return torch.from_numpy(arr.copy())


class PixelStore:
    """Each request holds the images it sent; an image's pixels go when its last holder ends.

    The image stage sends every request its own ImagePixels (even for an image another request
    already sent), so `holds(request_id, hash)` tells whether that request's pixels arrived."""

    def __init__(self) -> None:
        self.pixels: dict[str, torch.Tensor] = {}  # content hash -> [patches, C*tp*p*p], host
        self.holders: dict[str, set[str]] = {}  # content hash -> request ids
        self.held: dict[str, set[str]] = {}  # request id -> content hashes

    def add(self, msg: ImagePixels) -> None:
        if msg.content_hash not in self.pixels:
            self.pixels[msg.content_hash] = buffer_tensor(msg.pixel_values)
        self.holders.setdefault(msg.content_hash, set()).add(msg.request_id)
        self.held.setdefault(msg.request_id, set()).add(msg.content_hash)

    def holds(self, request_id: str, content_hash: str) -> bool:
        return content_hash in self.held.get(request_id, ())

    def get(self, content_hash: str) -> torch.Tensor:
        """The pixels of one image; raises KeyError if no request holds it."""
        if content_hash not in self.pixels:
            raise KeyError(f"pixels of image {content_hash} have not arrived")
        return self.pixels[content_hash]

    def release(self, request_id: str) -> None:
        """The request ended: drop its holds, and every image nobody else holds."""
        for content_hash in self.held.pop(request_id, ()):
            ids = self.holders[content_hash]
            ids.discard(request_id)
            if not ids:
                del self.holders[content_hash], self.pixels[content_hash]

    def __len__(self) -> int:
        return len(self.pixels)
