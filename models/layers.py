"""Building blocks of the decoder: RMSNorm, rotary position embedding, gated SiLU MLP.
Called by models/decoder.py for every token of every step the executor runs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 exactly like HF (normalise in fp32, cast back, then scale)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def add_norm(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, this norm of it): a residual add and the norm after it, which a device
        may fuse into one pass (devices/cpu_fused_layers.py)."""
        total = x + delta
        return total, self(total)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] in fp32, with "linear" or "llama3" scaling as in HF."""
    dim = config.head_dim
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponent)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}")


class RotaryEmbedding(nn.Module):
    """Maps absolute positions to (cos, sin) of shape [T, head_dim], HF's duplicated-half layout.

    Positions are [T], or [3, T] for M-RoPE (Qwen2.5-VL): each axis (temporal, height, width)
    gets its own angles and the frequency bands are taken from the axes in `mrope_section`
    chunks (HF `apply_multimodal_rotary_pos_emb`); `apply_rotary` is the same for both.
    """

    inv_freq: torch.Tensor  # a non-persistent buffer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.mrope_section = config.mrope_section
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_parameters(self) -> None:
        """Recomputes inv_freq (after a meta-device build + to_empty)."""
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [T, D/2] or [3, T, D/2]
        if positions.dim() == 2:
            if self.mrope_section is None:
                raise ValueError("positions [3, T] need a config with mrope_section")
            chunks = freqs.split(self.mrope_section, dim=-1)
            freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D]; cos/sin [T, D]. Standard rotate_half rotation."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GatedMLP(nn.Module):
    """SiLU-gated MLP. gate_proj and up_proj are fused into one matmul (gate_up_proj), a
    deliberate perf choice; the loader writes HF's gate/up weights into its two halves."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        bias = config.mlp_bias
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))
