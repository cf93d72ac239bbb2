"""load_model: builds a Decoder or Qwen2_5_VLModel from an HF folder (safetensors) or a .gguf.
The executor's model runner calls it once at start-up, before it sizes and allocates the KV cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from models.config import ModelConfig, config_from_hf
from models.decoder import Decoder
from models.gguf_loader import gguf_file_config, load_gguf_model
from models.parallel import TensorParallel, rank_config, shard_weights
from models.weights import build_empty, finish_loading


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_hf_config(folder: str | Path) -> ModelConfig:
    folder = Path(folder)
    cfg = _read_json(folder / "config.json")
    if cfg is None:
        raise FileNotFoundError(f"no config.json in {folder}")
    return config_from_hf(cfg, _read_json(folder / "generation_config.json"))


def safetensors_files(folder: Path) -> list[Path]:
    index = _read_json(folder / "model.safetensors.index.json")
    if index is not None:
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    single = folder / "model.safetensors"
    files = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {folder}")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield name, f.get_tensor(name)


def model_config(path: str) -> ModelConfig:
    """The checkpoint's whole-model config (HF folder or .gguf), without loading weights."""
    if str(path).endswith(".gguf"):
        return gguf_file_config(path)
    return load_hf_config(path)


def load_model(
    path: str, device: torch.device, dtype: torch.dtype, tp: TensorParallel | None = None
) -> Decoder:
    """Loads an HF folder or a .gguf file onto `device` in `dtype`, weights as checkpointed (the
    device's Platform.prepare_model adapts them to its kernels afterwards); with `tp`, this
    rank's share of them (models/parallel.py)."""
    tp = tp or TensorParallel()
    if str(path).endswith(".gguf"):
        return load_gguf_model(path, device, dtype, tp)
    folder = Path(path)
    config = load_hf_config(folder)
    model = build_empty(rank_config(config, tp), device, dtype, tp)
    weights = shard_weights(iter_safetensors(safetensors_files(folder)), config, tp)
    return finish_loading(model, model.load_weights(weights), str(folder))
