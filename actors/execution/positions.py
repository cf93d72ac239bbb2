"""Rotary positions of a step's tokens, from each request's executor state: plain indices for
text models, M-RoPE's three axes for Qwen2.5-VL (the prompt's from its image grids, a generated
token's at index + delta). Used by the model runner for every step it runs."""

from __future__ import annotations

import torch

from actors.execution.sequence import SequenceState
from protocols.messages import StepPlan


def decode_positions(plan: StepPlan, states: list[SequenceState], mrope: bool) -> list[list[int]]:
    """`step_positions` of a step of one-token sequences, as rows of Python ints (one row, or
    three for M-RoPE): what a recorded decode step copies in."""
    if not mrope:
        return [[s.start_pos for s in plan.sequences]]
    rows: list[list[int]] = [[], [], []]
    for s, state in zip(plan.sequences, states, strict=True):
        pos = state.mrope_positions
        assert pos is not None
        if s.start_pos < pos.shape[1]:
            column = pos[:, s.start_pos].tolist()
        else:
            column = [s.start_pos + state.mrope_delta] * 3
        for axis in range(3):
            rows[axis].append(column[axis])
    return rows


def step_positions(plan: StepPlan, states: list[SequenceState]) -> torch.Tensor:
    """Positions on the host: [T] for text models; [3, T] (M-RoPE) for VL models."""
    parts = []
    for s, state in zip(plan.sequences, states, strict=True):
        start, end = s.start_pos, s.start_pos + s.num_tokens
        pos = state.mrope_positions
        if pos is None:
            parts.append(torch.arange(start, end))
            continue
        n = pos.shape[1]
        head = pos[:, min(start, n) : min(end, n)]
        tail = torch.arange(max(start, n), max(end, n)).expand(3, -1) + state.mrope_delta
        parts.append(torch.cat([head, tail], dim=1))
    return torch.cat(parts, dim=-1)
