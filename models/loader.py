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
from models.parallel import Span, TensorParallel, rank_config, shard_weights
from models.quant.formats import (
    FORMAT_NAMES,
    canonical_weights,
    checkpoint_format,
    module_path,
    quantized_modules,
)
from models.quant.methods import LOAD_METHODS, quantize_model
from models.quant.spec import install
from models.weights import build_empty, finish_loading

QUANTIZE_AT_LOAD = tuple(LOAD_METHODS)  # --quantization values for unquantized checkpoints
# GGUF Q4 blocks stay int4 with these; by default they are dequantized: kept, SmolLM2's answer
# to "What is the capital of France?" (first token 0.09 logits from a tie) tips to "L'Étoile"
# in bf16 (BENCHMARKS.md, "Quantized weights").
GGUF_KEEPS_BLOCKS = ("gguf", *QUANTIZE_AT_LOAD)


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


class SafetensorsTensor:
    """One tensor of an open safetensors file (a CheckpointTensor): read whole by get_tensor, or
    a rank's rows / columns by get_slice, so that only their bytes of the file are read."""

    def __init__(self, file: safe_open, name: str) -> None:
        self.file, self.name = file, name

    def read(self, rows: Span | None = None, columns: Span | None = None) -> torch.Tensor:
        if rows is not None:
            return self.file.get_slice(self.name)[rows[0] : rows[1]]
        if columns is not None:
            return self.file.get_slice(self.name)[:, columns[0] : columns[1]]
        return self.file.get_tensor(self.name)


def safetensors_tensors(files: list[Path]) -> Iterator[tuple[str, SafetensorsTensor]]:
    """Every tensor of `files`, unread; each is readable until the iteration leaves its file."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                yield name, SafetensorsTensor(f, name)


def safetensors_names(files: list[Path]) -> list[str]:
    names: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names.extend(f.keys())
    return names


def model_config(path: str) -> ModelConfig:
    """The checkpoint's whole-model config (HF folder or .gguf), without loading weights."""
    if str(path).endswith(".gguf"):
        return gguf_file_config(path)
    return load_hf_config(path)


def load_model(
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    tp: TensorParallel | None = None,
    quantization: str = "none",
) -> Decoder:
    """Loads an HF folder or a .gguf file onto `device` in `dtype`, weights as checkpointed (the
    device's Platform.prepare_model adapts them to its kernels afterwards); with `tp`, this
    rank's share of them (models/parallel.py). `quantization` int8 / int4 quantizes the
    linears left unquantized once loaded (models/quant/methods.py); a GGUF file keeps its
    Q4_0 / Q4_1 blocks with gguf, int8 or int4 (else they are dequantized to `dtype`)."""
    tp = tp or TensorParallel()
    quantization = (quantization or "none").lower()
    if quantization != "none" and tp.size > 1:
        raise ValueError(
            f"--quantization {quantization} with tensor parallelism is not supported yet "
            "(quantized weights are not sharded); use --tensor-parallel-size 1"
        )
    if quantization == "gguf" and not str(path).endswith(".gguf"):
        raise ValueError(f"--quantization gguf, but {path} is not a .gguf file")
    if str(path).endswith(".gguf"):
        model = load_gguf_model(path, device, dtype, tp, quantization in GGUF_KEEPS_BLOCKS)
    else:
        model = _load_folder(Path(path), device, dtype, tp, quantization)
    if quantization in QUANTIZE_AT_LOAD:
        quantize_model(model, quantization)
    elif quantization not in ("none", "gguf", *FORMAT_NAMES):
        raise ValueError(f"unknown --quantization {quantization!r}")
    return model


def _load_folder(
    folder: Path, device: torch.device, dtype: torch.dtype, tp: TensorParallel, quantization: str
) -> Decoder:
    """An HF folder; linears the checkpoint stores quantized (config.json's
    quantization_config) become QuantizedLinear, read through their format's converter."""
    config = load_hf_config(folder)
    qc = (_read_json(folder / "config.json") or {}).get("quantization_config")
    fmt = checkpoint_format(qc, quantization if quantization in FORMAT_NAMES else "none")
    if fmt is not None and quantization in QUANTIZE_AT_LOAD:
        raise ValueError(f"--quantization {quantization}: the checkpoint is already {fmt.name}")
    if fmt is not None and tp.size > 1:
        raise ValueError(f"{fmt.name} checkpoints with tensor parallelism are not supported yet")
    model = build_empty(rank_config(config, tp), device, dtype, tp)
    files = safetensors_files(folder)
    weights = shard_weights(safetensors_tensors(files), config, tp)
    if fmt is not None:  # one rank: shard_weights read every tensor whole
        modules = quantized_modules(safetensors_names(files))
        install(model, fmt.spec, sorted({module_path(p) for p in modules}))
        weights = canonical_weights(weights, fmt, modules)
    return finish_loading(model, model.load_weights(weights), str(folder))
