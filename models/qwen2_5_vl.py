"""Qwen2.5-VL: the windowed ViT vision tower with its patch merger, and the VL model class.
The executor calls encode_image once per image, then runs the Qwen2 decoder with M-RoPE."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import PrefillKernel
from models.config import ModelConfig, VisionConfig
from models.decoder import Decoder
from models.layers import RMSNorm
from models.vision_kernels import Compiler, VisionKernels

# Checkpoint prefixes of the vision tower: published (legacy) and transformers 5 layouts.
VISUAL_PREFIX = re.compile(r"^(model\.)?visual\.")
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def vision_position_ids(grid_thw: tuple[int, int, int], merge: int) -> torch.Tensor:
    """(h, w) patch coordinates [t*h*w, 2], patches ordered merge-window by merge-window."""
    t, h, w = grid_thw
    hpos, wpos = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(shape).transpose(1, 2).flatten()
    wpos = wpos.reshape(shape).transpose(1, 2).flatten()
    return torch.stack([hpos, wpos], dim=-1).repeat(t, 1)


def window_index(
    grid_thw: tuple[int, int, int], merge: int, window: int
) -> tuple[torch.Tensor, list[int]]:
    """HF `get_vision_window_index` for one image: the permutation of merged units that groups
    them window by window (window = `window` merged units per side), and each window's length
    in patches (empty windows dropped)."""
    t, h, w = grid_thw
    gh, gw = h // merge, w // merge
    index = torch.arange(t * gh * gw).reshape(t, gh, gw)
    pad_h, pad_w = window - gh % window, window - gw % window
    nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
    padded = F.pad(index, (0, pad_w, 0, pad_h), "constant", -100)
    padded = padded.reshape(t, nh, window, nw, window).permute(0, 1, 3, 2, 4)
    padded = padded.reshape(t, nh * nw, window * window)
    lengths = (padded != -100).sum(-1).reshape(-1) * merge * merge
    flat = padded.reshape(-1)
    return flat[flat != -100], [int(n) for n in lengths if n > 0]


@dataclass
class Segments:
    """Consecutive runs of patches that attend only among themselves (attention windows or
    frames): their lengths, and for SDPA one gather index [n, L] per distinct length L, so each
    group is one batched SDPA call with no mask (a mask forces SDPA's slow math path); no index
    when there is one segment. A device's kernel takes the lengths."""

    lengths: list[int]
    groups: list[torch.Tensor] | None


def segments(lengths: list[int], device: torch.device) -> Segments:
    lengths = [n for n in lengths if n]
    if len(lengths) == 1:
        return Segments(lengths, None)
    starts = torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0).tolist()
    by_len: dict[int, list[int]] = {}
    for start, n in zip(starts, lengths):
        by_len.setdefault(n, []).append(start)
    groups = [
        (torch.tensor(firsts, device=device)[:, None] + torch.arange(n, device=device)[None, :])
        for n, firsts in by_len.items()
    ]
    return Segments(lengths, groups)


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segs: Segments,
    kernel: PrefillKernel | None = None,
) -> torch.Tensor:
    """q/k/v [S, heads, D] -> [S, heads, D], attention only within each segment: the device's
    kernel where there is one, else SDPA."""
    if kernel is not None:
        return kernel(q, k, v, segs.lengths, segs.lengths, causal=False)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [heads, S, D]
    if segs.groups is None:  # 4-D, or SDPA on CPU falls back to its slow math path
        return F.scaled_dot_product_attention(q[None], k[None], v[None])[0].transpose(0, 1)
    out = torch.empty_like(q)
    for index in segs.groups:
        qs, ks, vs = (t[:, index].transpose(0, 1) for t in (q, k, v))  # [n, heads, L, D]
        out[:, index] = F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1)
    return out.transpose(0, 1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        segs: Segments,
        kernels: VisionKernels,
        attention: PrefillKernel | None,
    ) -> torch.Tensor:
        seq = x.shape[0]
        qkv = self.qkv(x).view(seq, 3, self.num_heads, self.head_dim)
        q, k, v = kernels.rotate_qk(qkv, *cos_sin)
        out = segment_attention(q, k, v, segs, attention)
        return self.proj(out.reshape(seq, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, kernels: VisionKernels) -> torch.Tensor:
        return self.down_proj(kernels.gate(self.gate_proj(x), self.up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, 1e-6)
        self.norm2 = RMSNorm(config.hidden_size, 1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        segs: Segments,
        kernels: VisionKernels,
        attention: PrefillKernel | None = None,
    ) -> torch.Tensor:
        norm1, norm2 = self.norm1, self.norm2
        h = kernels.rms_norm(x, norm1.weight, norm1.eps)
        x = x + self.attn(h, cos_sin, segs, kernels, attention)
        return x + self.mlp(kernels.rms_norm(x, norm2.weight, norm2.eps), kernels)


class PatchMerger(nn.Module):
    """RMSNorm, then each merge×merge group of patches concatenated through a GELU MLP."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.group_size = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = RMSNorm(config.hidden_size, 1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.group_size, self.group_size),
            nn.GELU(),
            nn.Linear(self.group_size, config.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.group_size))


class VisionTransformer(nn.Module):
    """HF `Qwen2_5_VisionTransformerPretrainedModel`, for one image or several at once.

    The Conv3d patch embedding (kernel == stride) is a Linear over the flattened patch; the
    loader reshapes the conv weight into it.
    """

    inv_freq: torch.Tensor  # a non-persistent buffer

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size**2
        self.patch_embed = nn.Linear(patch_dim, c.hidden_size, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(c) for _ in range(c.depth))
        self.merger = PatchMerger(c)
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)
        self.kernels = VisionKernels.eager(ACTIVATIONS[c.hidden_act])
        self.attention: PrefillKernel | None = None  # a device's kernel for the segments; SDPA

    def use_compiler(self, compile: Compiler) -> None:
        """Runs the blocks' elementwise steps through `compile` (models/vision_kernels.py), and
        encodes one small blank image so that compiling happens now, not on a first request."""
        self.kernels = VisionKernels.compiled(ACTIVATIONS[self.config.hidden_act], compile)
        c, weight = self.config, next(self.parameters())
        patch_dim = c.in_channels * c.temporal_patch_size * c.patch_size**2
        # 14 x 22 patches: a count (308) that equals no model dimension, so the compiler keeps
        # the patch count symbolic instead of tying it to, say, the head size.
        grid = (1, 7 * c.spatial_merge_size, 11 * c.spatial_merge_size)
        with torch.no_grad():
            self.forward(weight.new_zeros(grid[1] * grid[2], patch_dim), grid)

    def _inv_freq(self) -> torch.Tensor:
        spatial_dim = self.config.hidden_size // self.config.num_heads // 2
        exponent = torch.arange(0, spatial_dim, 2, dtype=torch.float32, device="cpu") / spatial_dim
        return 1.0 / (self.config.rope_theta**exponent)

    def reset_parameters(self) -> None:
        """Recomputes inv_freq (after a meta-device build + to_empty)."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def forward(self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """pixel_values [t*h*w, C*tp*p*p] -> merged tokens [t*h*w / merge², out_hidden_size]."""
        return self.forward_many([(pixel_values, grid_thw)])[0]

    def forward_many(
        self, images: list[tuple[torch.Tensor, tuple[int, int, int]]]
    ) -> list[torch.Tensor]:
        """Several images in one pass: their patches are concatenated, so every linear layer runs
        once for all of them; attention stays within each image's windows and frames."""
        c = self.config
        device = images[0][0].device
        unit = c.spatial_merge_size**2
        window = c.window_size // c.spatial_merge_size // c.patch_size
        xs, freq_parts, orders, window_lengths, frame_lengths, sizes = [], [], [], [], [], []
        units_before = 0
        for pixel_values, grid in images:
            grid_thw = (int(grid[0]), int(grid[1]), int(grid[2]))
            x = self.patch_embed(pixel_values.to(next(self.parameters()).dtype))
            seq = x.shape[0]
            if seq != grid_thw[0] * grid_thw[1] * grid_thw[2]:
                raise ValueError(f"{seq} patches do not fill grid {grid_thw}")
            order, lengths = window_index(grid_thw, c.spatial_merge_size, window)
            order = order.to(device)
            xs.append(x.view(seq // unit, unit, -1)[order].reshape(seq, -1))
            pos = vision_position_ids(grid_thw, c.spatial_merge_size).to(device)
            freqs = (pos.to(torch.float32)[..., None] * self.inv_freq).flatten(1)  # h, w angles
            freq_parts.append(freqs.view(seq // unit, unit, -1)[order].reshape(seq, -1))
            orders.append(order + units_before)
            units_before += seq // unit
            window_lengths += lengths
            frame_lengths += [grid_thw[1] * grid_thw[2]] * grid_thw[0]
            sizes.append(seq // unit)
        x = torch.cat(xs)
        freqs = torch.cat(freq_parts)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos_sin = (emb.cos(), emb.sin())
        frames = segments(frame_lengths, device)  # full attention within each frame
        windows = segments(window_lengths, device)
        for i, block in enumerate(self.blocks):
            segs = frames if i in c.fullatt_block_indexes else windows
            x = block(x, cos_sin, segs, self.kernels, self.attention)
        merged = self.merger(x)[torch.argsort(torch.cat(orders))]
        return list(merged.split(sizes))

    @torch.no_grad()
    def load_weight(self, name: str, tensor: torch.Tensor) -> str:
        """Copies one HF vision tensor (name without the `visual.` prefix); returns our name."""
        if name == "patch_embed.proj.weight":
            name, tensor = "patch_embed.weight", tensor.reshape(tensor.shape[0], -1)
        params = dict(self.named_parameters())
        if name not in params:
            raise KeyError(f"checkpoint tensor visual.{name!r} has no place in the vision tower")
        target = params[name]
        if target.shape != tensor.shape:
            raise ValueError(f"visual.{name}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
        target.copy_(tensor)
        return name


class Qwen2_5_VLModel(Decoder):
    """The Qwen2 decoder (M-RoPE positions [3, T]) plus the vision tower under `visual`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if config.vision is None or config.mrope_section is None:
            raise ValueError("a qwen2_5_vl config needs vision_config and mrope_section")
        self.visual = VisionTransformer(config.vision)

    def encode_image(
        self, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]
    ) -> torch.Tensor:
        """One image's patches [t*h*w, C*tp*p*p] -> its placeholder embeddings [t*h*w/merge², H]."""
        return self.visual(pixel_values, grid_thw)

    def encode_images(
        self, images: list[tuple[torch.Tensor, tuple[int, int, int]]]
    ) -> list[torch.Tensor]:
        """Several images' patches in one batched vision pass; one embedding tensor per image."""
        return self.visual.forward_many(images)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Vision tensors go to the tower, everything else to Decoder.load_weights."""
        loaded: set[str] = set()

        def text_only() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                match = VISUAL_PREFIX.match(name)
                if match is None:
                    yield name, tensor
                else:
                    loaded.add("visual." + self.visual.load_weight(name[match.end() :], tensor))

        return super().load_weights(text_only()) | loaded
