"""The decoder-only transformer (Llama / Qwen2 families): embeddings, layers, norm, lm_head.
The executor calls it once per step with all scheduled tokens packed; it returns hidden states.
A tensor-parallel rank holds its vocabulary rows of the embedding and head (models/parallel.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import torch
from torch import nn

from models.attention import Attention, AttentionMetadata, KVCache
from models.config import ModelConfig
from models.layers import GatedMLP, RMSNorm, RotaryEmbedding
from models.parallel import TensorParallel, VocabParallelEmbedding

# HF projection name -> (our fused parameter, shard index among the fused parts).
FUSED_SHARDS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Prefixes under which checkpoints nest the language model (plain LLM, VLM layouts).
HF_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
SKIPPED = re.compile(r"rotary_emb\.inv_freq|^visual\.|^model\.visual\.")


def _unreduced(x: torch.Tensor) -> torch.Tensor:
    return x


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config)
        # Tensor parallel: o_proj and down_proj give this rank's partial sums; the loader sets
        # the all-reduce that completes them (models/parallel.py). One rank: nothing to sum.
        self.reduce: Callable[[torch.Tensor], torch.Tensor] = _unreduced

    def forward(
        self,
        x: torch.Tensor,
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos_sin, meta, cache)
        x, h = self.post_attention_layernorm.add_norm(x, self.reduce(h))
        return x + self.reduce(self.mlp(h))


# Runs one layer: (layer, x, cos_sin, meta, cache) -> x. A device may hand forward a compiled one.
LayerRunner = Callable[
    [nn.Module, torch.Tensor, tuple[torch.Tensor, torch.Tensor], AttentionMetadata, KVCache],
    torch.Tensor,
]


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tp = TensorParallel()  # one rank: the whole vocabulary (see shard_vocab)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def shard_vocab(self, tp: TensorParallel) -> None:
        """Keeps this rank's vocabulary rows `tp.span(vocab)` of the embedding and the LM head
        (tied ones stay one tensor); `embed` and `compute_logits` still give the whole
        vocabulary's, through tp's collectives. Called by build_empty before the weights load."""
        c = self.config
        lo, hi = tp.span(c.vocab_size)
        self.tp = tp
        self.embed_tokens = VocabParallelEmbedding((lo, hi), c.hidden_size, tp.reduce)
        self.lm_head = nn.Linear(c.hidden_size, hi - lo, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [T, H]; the executor overwrites image rows before calling forward."""
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
        inputs_embeds: torch.Tensor | None = None,
        run_layer: LayerRunner | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos_sin = self.rotary(positions, x.dtype)  # once per step, shared by all layers
        # positions: [T], or [3, T] (M-RoPE) for Qwen2.5-VL
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            if run_layer is None:
                x = layer(x, cos_sin, meta, cache)
            else:
                x = run_layer(layer, x, cos_sin, meta, cache)
        return self.norm(x)

    def compute_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits [rows, vocab] over the whole vocabulary, on every tensor-parallel rank."""
        logits = self.tp.gather_columns(self.lm_head(hidden_rows), self.config.vocab_size)
        return logits.float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copies HF-named tensors into our modules; returns the names of the parameters filled.
        q/k/v and gate/up land in row blocks of the fused qkv_proj / gate_up_proj."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if SKIPPED.search(hf_name):
                continue
            name = hf_name
            for prefix in HF_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    break
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in FUSED_SHARDS:
                fused, shard = FUSED_SHARDS[parts[-2]]
                name = ".".join([*parts[:-2], fused, parts[-1]])
                if parts[-1] == "input_perm":  # act-order: one input permutation for all shards
                    target = self._same_input_perm(params[name], tensor, name in loaded)
                else:
                    target = self._shard(params[name], fused, shard)
            elif name in params:
                target = params[name]
            else:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no place in the model")
            if target.shape != tensor.shape:
                raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
            target.copy_(tensor)
            loaded.add(name)
        return loaded

    @staticmethod
    def _same_input_perm(param: torch.Tensor, perm: torch.Tensor, seen: bool) -> torch.Tensor:
        """GPTQ act-order orders the inputs of q/k/v (gate/up) alike: they read the same x."""
        if seen and not torch.equal(param, perm.to(param.device)):
            raise ValueError("fused projections with different act-order input permutations")
        return param

    def _shard(self, param: torch.Tensor, fused: str, shard: int) -> torch.Tensor:
        c = self.config
        if fused == "qkv_proj":
            sizes = [
                c.num_heads * c.head_dim,
                c.num_kv_heads * c.head_dim,
                c.num_kv_heads * c.head_dim,
            ]
        else:
            sizes = [c.intermediate_size, c.intermediate_size]
        return param.narrow(0, sum(sizes[:shard]), sizes[shard])
