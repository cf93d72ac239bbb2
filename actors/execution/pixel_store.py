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


def input_values(values: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """Vision inputs from stored pixels: float values as they are, or uint8 samples through their
    [C, 256] table (a column's channel is column // (columns / C)), on the values' device."""
    if table is None:
        return values
    columns = values.shape[1]
    channel = torch.arange(columns, device=values.device) // (columns // table.shape[0])
    return table.to(values.device).flatten()[channel * 256 + values.long()]


class PixelStore:
    """Each request holds the images it sent; an image's pixels go when its last holder ends.

    The image stage sends every request its own ImagePixels (even for an image another request
    already sent), so `holds(request_id, hash)` tells whether that request's pixels arrived."""

    def __init__(self) -> None:
        # content hash -> ([patches, C*tp*p*p] on the host, its value table or None)
        self.pixels: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.holders: dict[str, set[str]] = {}  # content hash -> request ids
        self.held: dict[str, set[str]] = {}  # request id -> content hashes

    def add(self, msg: ImagePixels) -> None:
        if msg.content_hash not in self.pixels:
            table = None if msg.value_table is None else buffer_tensor(msg.value_table)
            self.pixels[msg.content_hash] = (buffer_tensor(msg.pixel_values), table)
        self.holders.setdefault(msg.content_hash, set()).add(msg.request_id)
        self.held.setdefault(msg.request_id, set()).add(msg.content_hash)

    def holds(self, request_id: str, content_hash: str) -> bool:
        return content_hash in self.held.get(request_id, ())

    def get(self, content_hash: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The vision inputs of one image on `device` in `dtype` (8-bit samples are moved as
        they are and mapped there); raises KeyError if no request holds it."""
        if content_hash not in self.pixels:
            raise KeyError(f"pixels of image {content_hash} have not arrived")
        values, table = self.pixels[content_hash]
        return input_values(values.to(device), table).to(dtype)

    def release(self, request_id: str) -> None:
        """The request ended: drop its holds, and every image nobody else holds."""
        for content_hash in self.held.pop(request_id, ()):
            ids = self.holders[content_hash]
            ids.discard(request_id)
            if not ids:
                del self.holders[content_hash], self.pixels[content_hash]

    def __len__(self) -> int:
        return len(self.pixels)
