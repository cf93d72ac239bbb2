"""load_model: builds a Decoder or Qwen2_5_VLModel from an HF folder (safetensors) or a .gguf.
The executor calls it once at start-up, before it allocates the KV cache."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from models.config import ModelConfig, config_from_hf
from models.decoder import Decoder
from models.layers import pack_linears_for_cpu
from models.qwen2_5_vl import Qwen2_5_VLModel

# Architecture -> model class; text-only families are the plain Decoder.
MODEL_CLASSES: dict[str, type[Decoder]] = {"qwen2_5_vl": Qwen2_5_VLModel}


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


def build_empty(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Decoder:
    """Constructs the module tree without initialising weights (they are loaded right after)."""
    with torch.device("meta"):
        model = MODEL_CLASSES.get(config.architecture, Decoder)(config)
    model = model.to(dtype).to_empty(device=device)  # cast while on meta: no double allocation
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.reset_parameters()  # inv_freq stays fp32 whatever the weight dtype
    if isinstance(model, Qwen2_5_VLModel):
        model.visual.reset_parameters()
    return model.eval().requires_grad_(False)


def finish_loading(model: Decoder, loaded: set[str], source: str) -> Decoder:
    expected = {n for n, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{source}: weights missing from checkpoint: {missing[:8]}")
    return model


def load_model(path: str, device: torch.device, dtype: torch.dtype) -> Decoder:
    """Loads an HF folder or a .gguf file onto `device` in `dtype`."""
    if str(path).endswith(".gguf"):
        from models.gguf_loader import load_gguf_model

        model = load_gguf_model(path, device, dtype)
    else:
        folder = Path(path)
        config = load_hf_config(folder)
        model = build_empty(config, device, dtype)
        loaded = model.load_weights(iter_safetensors(safetensors_files(folder)))
        model = finish_loading(model, loaded, str(folder))
    if device.type == "cpu":
        pack_linears_for_cpu(model)  # faster decode products on CPU; see OneDNNLinear
    return model
