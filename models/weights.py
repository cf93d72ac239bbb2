"""Shared by both checkpoint loaders (safetensors folders and GGUF files): build an empty model
on the target device, then check every parameter was filled. Used by models.loader/gguf_loader."""

from __future__ import annotations

from typing import cast

import torch

from models.config import ModelConfig
from models.decoder import Decoder, DecoderLayer
from models.parallel import TensorParallel
from models.qwen2_5_vl import Qwen2_5_VLModel

# Architecture -> model class; text-only families are the plain Decoder.
MODEL_CLASSES: dict[str, type[Decoder]] = {"qwen2_5_vl": Qwen2_5_VLModel}


def build_empty(
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    tp: TensorParallel | None = None,
) -> Decoder:
    """Constructs the module tree without initialising weights (they are loaded right after);
    `config` is the rank's (models/parallel.rank_config), and `tp` gives its layers the sum and
    its embedding and LM head the rank's vocabulary rows (Decoder.shard_vocab)."""
    tp = tp or TensorParallel()
    with torch.device("meta"):
        model = MODEL_CLASSES.get(config.architecture, Decoder)(config)
        if tp.size > 1:
            model.shard_vocab(tp)
    model = model.to(dtype).to_empty(device=device)  # cast while on meta: no double allocation
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.reset_parameters()  # inv_freq stays fp32 whatever the weight dtype
    if tp.size > 1:
        for layer in model.layers:
            cast(DecoderLayer, layer).reduce = tp.reduce
    if isinstance(model, Qwen2_5_VLModel):
        model.visual.reset_parameters()
    return model.eval().requires_grad_(False)


def finish_loading(model: Decoder, loaded: set[str], source: str) -> Decoder:
    """`model` once every parameter was loaded; raises naming the first ones that were not."""
    expected = {n for n, _ in model.named_parameters()}
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{source}: weights missing from checkpoint: {missing[:8]}")
    return model
