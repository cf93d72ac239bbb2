"""Loads a llama.cpp GGUF file: metadata -> ModelConfig, tensors to HF names/shapes, Q4_0 / Q4_1
linears kept quantized (models/quant/gguf.py) and every other type dequantised to the run dtype
(a tensor-parallel rank dequantizes only its rows where it can: GgufTensor).
Called by models.loader.load_model when the model path ends in .gguf."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from models.decoder import Decoder
from models.parallel import (
    CheckpointTensor,
    Span,
    TensorInMemory,
    TensorParallel,
    rank_config,
    shard_weights,
)
from models.quant.formats import module_path
from models.quant.gguf import KEPT_TYPES, canonical, q4_blocks
from models.quant.spec import QuantSpec, install
from models.weights import build_empty, finish_loading

GGUF_Q4 = QuantSpec("gguf", bits=4, group_size=32, symmetric=False)

# llama.cpp tensor name -> HF tensor name ({n} is the layer index).
GGUF_TO_HF: dict[str, str] = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "model.layers.{n}.input_layernorm",
    "attn_q": "model.layers.{n}.self_attn.q_proj",
    "attn_k": "model.layers.{n}.self_attn.k_proj",
    "attn_v": "model.layers.{n}.self_attn.v_proj",
    "attn_output": "model.layers.{n}.self_attn.o_proj",
    "ffn_norm": "model.layers.{n}.post_attention_layernorm",
    "ffn_gate": "model.layers.{n}.mlp.gate_proj",
    "ffn_up": "model.layers.{n}.mlp.up_proj",
    "ffn_down": "model.layers.{n}.mlp.down_proj",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL = re.compile(r"^(\w+)\.(weight|bias)$")


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: GGUFReader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}")
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    names = {t.name for t in reader.tensors}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=SUPPORTED_MODEL_TYPES[arch],
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=any(n.endswith("attn_q.bias") for n in names),
        eos_token_ids=[] if eos is None else [int(eos)],
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
    )


def hf_name(gguf_name: str) -> str:
    if m := _BLOCK.match(gguf_name):
        return f"{GGUF_TO_HF[m.group(2)].format(n=m.group(1))}.{m.group(3)}"
    if m := _GLOBAL.match(gguf_name):
        return f"{GGUF_TO_HF[m.group(1)]}.{m.group(2)}"
    raise KeyError(f"unknown GGUF tensor {gguf_name!r}")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes convert_hf_to_gguf.py's Q/K row permutation for llama (as transformers does):
    llama.cpp interleaves the two rotate_half halves of each head; we restore HF's layout."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def kept_quantized(reader: GGUFReader) -> set[str]:
    """Our linear modules whose every GGUF shard is Q4_0 / Q4_1 (kept as int4 groups)."""
    types: dict[str, set[bool]] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name.endswith(".weight") and ("layers." in name or name == "lm_head.weight"):
            if name.endswith("layernorm.weight"):
                continue
            types.setdefault(module_path(name.removesuffix(".weight")), set()).add(
                tensor.tensor_type in KEPT_TYPES
            )
    return {path for path, kept in types.items() if kept == {True}}


def permuted_heads(name: str, config: ModelConfig) -> int:
    """The head count of a llama Q / K tensor, whose rows convert_hf_to_gguf.py permuted, else 0."""
    if config.architecture != "llama":
        return 0
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_heads
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return config.num_kv_heads
    return 0


class GgufTensor:
    """One GGUF tensor in HF layout and fp32 (a CheckpointTensor), dequantized when read. A row
    span is cut from the quantized rows before dequantizing (a GGUF row is whole blocks); a column
    span is cut after dequantizing every row (columns cut through the blocks)."""

    def __init__(self, tensor: ReaderTensor, heads: int = 0) -> None:
        # GGUF lists dims fastest-first; HF shape is the reverse.
        self.tensor = tensor
        self.shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        self.heads = heads  # permuted_heads

    def read(self, rows: Span | None = None, columns: Span | None = None) -> torch.Tensor:
        lo, hi = rows or (0, self.shape[0])
        w = dequantize(self.tensor.data[lo:hi], self.tensor.tensor_type)
        w = w.reshape(hi - lo, *self.shape[1:])
        if self.heads:
            w = unpermute_qk(w, self._heads_in(lo, hi))
        if columns is not None:
            w = w[:, columns[0] : columns[1]]
        w = np.ascontiguousarray(w, dtype=np.float32)
        return torch.from_numpy(w if w.flags.writeable else w.copy())

    def q4_parts(self) -> dict[str, torch.Tensor]:
        """QuantizedLinear's tensors of this whole Q4_0 / Q4_1 weight (models/quant/gguf.py)."""
        rows, cols = self.shape
        arrays: tuple[np.ndarray, ...] = q4_blocks(
            self.tensor.data, self.tensor.tensor_type, rows, cols
        )
        if self.heads:
            arrays = tuple(unpermute_qk(a, self.heads) for a in arrays)
        return canonical(*arrays)

    def _heads_in(self, lo: int, hi: int) -> int:
        per_head = self.shape[0] // self.heads
        if lo % per_head or hi % per_head:
            raise ValueError(f"{self.tensor.name}: rows {lo}-{hi} cut through a head")
        return (hi - lo) // per_head


def gguf_tensors(
    reader: GGUFReader, config: ModelConfig, kept: frozenset[str] = frozenset()
) -> Iterator[tuple[str, CheckpointTensor]]:
    """HF-named tensors, unread; a weight of a module in `kept` comes as QuantizedLinear's tensors
    (`<module>.qweight`, `.scales`, `.offsets`) instead of `<module>.weight`."""
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        source = GgufTensor(tensor, permuted_heads(name, config))
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and module_path(prefix) in kept:
            for part, value in source.q4_parts().items():
                yield f"{prefix}.{part}", TensorInMemory(value)
        else:
            yield name, source


def gguf_file_config(path: str) -> ModelConfig:
    return gguf_config(GGUFReader(path))


def load_gguf_model(
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    tp: TensorParallel | None = None,
    keep_quantized: bool = False,
) -> Decoder:
    """The model of a .gguf file; Q4_0 / Q4_1 linears stay int4 unless not `keep_quantized`."""
    tp = tp or TensorParallel()
    reader = GGUFReader(path)
    config = gguf_config(reader)
    model = build_empty(rank_config(config, tp), device, dtype, tp)
    kept = frozenset(kept_quantized(reader) if keep_quantized and tp.size == 1 else ())
    install(model, GGUF_Q4, sorted(kept))
    weights = shard_weights(gguf_tensors(reader, config, kept), config, tp)
    return finish_loading(model, model.load_weights(weights), path)
