"""mrope_positions on hand-worked prompts: exact 3D positions, delta, and malformed placeholders.
(test_qwen2_5_vl_matches_hf checks it against transformers' get_rope_index as well.)"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from models.mrope import mrope_positions

IMG, VS, VE = 151655, 151652, 151653


def test_text_only_is_arange_with_zero_delta() -> None:
    positions, delta = mrope_positions([5, 6, 7, 8], [], IMG, 2)
    np.testing.assert_array_equal(positions, np.tile(np.arange(4), (3, 1)))
    assert positions.dtype == np.int64 and delta == 0
    empty, delta = mrope_positions([], [], IMG, 2)
    assert empty.shape == (3, 0) and delta == 0


def test_one_image_gets_grid_coordinates_and_text_resumes_after_it() -> None:
    # grid (1, 4, 6) with merge 2 -> 2 x 3 merged tokens.
    ids = [1, 2, VS] + [IMG] * 6 + [VE, 3]
    positions, delta = mrope_positions(ids, [(1, 4, 6)], IMG, 2)
    expected = np.array(
        [
            [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],
            [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],
            [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7],
        ]
    )
    np.testing.assert_array_equal(positions, expected)
    assert delta == 7 + 1 - len(ids)  # the next token (index 11) gets position 8


def test_adjacent_images_are_split_by_their_grids() -> None:
    ids = [VS] + [IMG] * 2 + [IMG] * 4 + [VE]  # (1,2,4) then (1,4,4): no text between
    positions, delta = mrope_positions(ids, [(1, 2, 4), (1, 4, 4)], IMG, 2)
    np.testing.assert_array_equal(positions[0], [0, 1, 1, 3, 3, 3, 3, 5])
    np.testing.assert_array_equal(positions[1], [0, 1, 1, 3, 3, 4, 4, 5])
    np.testing.assert_array_equal(positions[2], [0, 1, 2, 3, 4, 3, 4, 5])
    assert delta == 5 + 1 - len(ids)


@pytest.mark.parametrize(
    ("ids", "grids"),
    [
        ([VS, IMG, IMG, VE], [(1, 4, 6)]),  # too few placeholders for the grid
        ([VS, IMG, VE], []),  # placeholders without a grid
        ([1, 2, 3], [(1, 2, 2)]),  # a grid without placeholders
    ],
)
def test_malformed_placeholders_raise(ids: list[int], grids: list[tuple[int, int, int]]) -> None:
    with pytest.raises(ValueError):
        mrope_positions(ids, grids, IMG, 2)


def test_module_does_not_import_torch() -> None:
    code = "import sys, models.mrope; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
