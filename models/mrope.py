"""M-RoPE (Qwen2.5-VL) 3D position ids for a prompt whose image placeholders are expanded.
Computed once per request by the image preprocessing stage (numpy only, no torch import)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mrope_positions(
    input_ids: Sequence[int],
    image_grid_thw: Sequence[tuple[int, int, int]],
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, int]:
    """Returns (positions int64 [3, L], delta), as transformers' `get_rope_index` for images.

    Text tokens advance all three axes together; an image's (t*h*w)//merge² placeholder tokens
    get (t, h, w) grid coordinates offset by the position reached before it, and the text after
    it resumes at that offset + max(t, h/merge, w/merge). A token generated at absolute index i
    has position i + delta on all three axes.
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    length = int(ids.shape[0])
    positions = np.empty((3, length), dtype=np.int64)
    is_image = ids == image_token_id
    image_starts = np.flatnonzero(is_image & ~np.concatenate(([False], is_image[:-1])))
    merge = spatial_merge_size
    cursor = 0  # next free index in ids
    next_pos = 0  # position the next text token gets
    image = 0
    while cursor < length:
        if not is_image[cursor]:
            later = image_starts[image_starts > cursor]
            end = int(later[0]) if later.size else length
            positions[:, cursor:end] = np.arange(end - cursor, dtype=np.int64) + next_pos
            next_pos += end - cursor
            cursor = end
            continue
        if image >= len(image_grid_thw):
            raise ValueError(f"more image placeholder runs than the {len(image_grid_thw)} grids")
        t, h, w = (int(v) for v in image_grid_thw[image])
        gh, gw = h // merge, w // merge
        count = t * gh * gw
        if cursor + count > length or not is_image[cursor : cursor + count].all():
            raise ValueError(f"image {image} needs {count} consecutive placeholder tokens")
        grid = np.indices((t, gh, gw), dtype=np.int64).reshape(3, -1)
        positions[:, cursor : cursor + count] = grid + next_pos
        next_pos += max(t, gh, gw)
        cursor += count
        image += 1
    if image != len(image_grid_thw):
        raise ValueError(f"{len(image_grid_thw)} image grids but {image} placeholder runs")
    delta = int(positions.max()) + 1 - length if length else 0
    return positions, delta
