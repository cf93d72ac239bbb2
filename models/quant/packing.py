"""Bit unpacking of the checkpoint formats' int32 words into integer values, per published layout.
Used by models/quant/formats.py when a pre-quantized checkpoint is loaded."""

from __future__ import annotations

import torch

# AutoAWQ's GEMM layout: nibble i of a word holds column 8c + AWQ_ORDER[i] of its 8 columns.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, C * 32 / bits]: field i of word c (bits i*b..) is value
    c * (32 / b) + i (little-endian fields, as GPTQ, AWQ and compressed-tensors pack)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    fields = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(packed.shape[0], packed.shape[1] * per_word)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [R, C] (4-bit, interleaved order) -> int32 [R, 8 C] in column order."""
    fields = unpack_int32(packed, 4).view(packed.shape[0], packed.shape[1], 8)
    inverse = torch.argsort(torch.tensor(AWQ_ORDER))
    return fields[..., inverse].reshape(packed.shape[0], -1)


def expand_rows(scales: torch.Tensor, block_rows: int, rows: int) -> torch.Tensor:
    """Scales over blocks of `block_rows` rows -> one row of scales per weight row."""
    return scales.repeat_interleave(block_rows, dim=0)[:rows]
