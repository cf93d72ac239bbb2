"""GGUF Q4_0 / Q4_1 blocks kept quantized: each block of 32 weights maps exactly onto a canonical
int4 group of 32 (models/quant/linear.py). Called by models/gguf_loader.py while it reads a file.

Block layouts (ggml-quants.c): Q4_0 = fp16 d, 16 bytes of nibbles, w = (q - 8) * d; Q4_1 = fp16
d, fp16 m, 16 bytes, w = q * d + m. In both, byte j holds weight j (low nibble) and j + 16 (high).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from models.quant.linear import pack_int4

KEPT_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
BLOCK = 32


def q4_blocks(
    data: np.ndarray, kind: GGMLQuantizationType, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values uint8 [rows, cols] in 0..15, scales and offsets fp32 [rows, cols / 32]) of a
    Q4_0 / Q4_1 tensor from its raw blocks, so that w = values * scales + offsets."""
    head = 2 if kind == GGMLQuantizationType.Q4_0 else 4
    blocks = np.ascontiguousarray(data).reshape(rows, cols // BLOCK, head + BLOCK // 2)
    d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., head:]
    values = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(rows, cols)
    if kind == GGMLQuantizationType.Q4_0:
        offsets = -8.0 * d
    else:
        offsets = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return values, d, offsets


def canonical(
    values: np.ndarray, scales: np.ndarray, offsets: np.ndarray
) -> dict[str, torch.Tensor]:
    """QuantizedLinear's tensors (by parameter name) from q4_blocks' arrays."""
    return {
        "qweight": pack_int4(torch.from_numpy(np.ascontiguousarray(values))),
        "scales": torch.from_numpy(np.ascontiguousarray(scales)),
        "offsets": torch.from_numpy(np.ascontiguousarray(offsets)),
    }
