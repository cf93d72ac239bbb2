"""ModelConfig: the one description of a decoder LLM (and a VLM's vision tower) models/ reads.
Built by the loaders from an HF config.json (+ generation_config.json) or from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# HF model_type -> our architecture family. Add a family here and in decoder.py, nowhere else.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen2_5_vl": "qwen2_5_vl",
}


@dataclass
class VisionConfig:
    """Qwen2.5-VL vision tower (HF `vision_config`); field names follow HF's."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list[int] = field(default_factory=list)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> VisionConfig:
        rope = cfg.get("rope_parameters") or {}
        return cls(
            depth=int(cfg["depth"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=int(cfg["num_heads"]),
            out_hidden_size=int(cfg["out_hidden_size"]),
            in_channels=int(cfg.get("in_channels", cfg.get("in_chans", 3))),
            patch_size=int(cfg.get("patch_size", 14)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            spatial_merge_size=int(cfg.get("spatial_merge_size", 2)),
            window_size=int(cfg.get("window_size", 112)),
            fullatt_block_indexes=[int(i) for i in cfg.get("fullatt_block_indexes", [])],
            hidden_act=str(cfg.get("hidden_act", "silu")),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
        )


@dataclass
class ModelConfig:
    architecture: str  # "llama" | "qwen2" | "qwen2_5_vl"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    # Qwen2.5-VL only: M-RoPE sections (over head_dim / 2), special ids, the vision tower.
    mrope_section: list[int] | None = None
    image_token_id: int | None = None
    video_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    spatial_merge_size: int | None = None
    vision: VisionConfig | None = None

    @property
    def o_proj_bias(self) -> bool:
        """Llama puts the attention bias on o_proj too; Qwen2 biases only q/k/v."""
        return self.attention_bias and self.architecture == "llama"


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _rope_params(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None, list[int] | None]:
    """Reads rope theta, scaling and M-RoPE sections from either the legacy (rope_theta +
    rope_scaling) or the transformers 5 (rope_parameters) layout; scaling None for plain RoPE.
    Qwen2.5-VL's `{type: mrope, mrope_section}` is plain RoPE frequencies plus the sections."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling")
    if legacy:
        params = {**params, **legacy}
    theta = float(cfg.get("rope_theta") or params.pop("rope_theta", 10000.0))
    params.pop("rope_theta", None)
    section = params.pop("mrope_section", None)
    mrope_section = [int(s) for s in section] if section else None
    rope_type = params.get("rope_type", params.get("type"))
    if rope_type in (None, "default", "mrope"):
        return theta, None, mrope_section
    params["rope_type"] = rope_type
    params.pop("type", None)
    return theta, params, mrope_section


def config_from_hf(
    cfg: dict[str, Any], generation_config: dict[str, Any] | None = None
) -> ModelConfig:
    """Builds a ModelConfig from a parsed config.json; reads `text_config` when it is nested."""
    text = cfg.get("text_config") or cfg
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        model_type = text.get("model_type") or model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = cfg.get("architectures")
        raise ValueError(
            f"unsupported architecture: model_type={model_type!r} architectures={archs!r}; "
            f"supported model types: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    arch = SUPPORTED_MODEL_TYPES[model_type]
    num_heads = int(text["num_attention_heads"])
    head_dim = text.get("head_dim") or text["hidden_size"] // num_heads
    theta, scaling, mrope_section = _rope_params(text)
    eos = _as_id_list(text.get("eos_token_id", cfg.get("eos_token_id")))
    for tok in _as_id_list((generation_config or {}).get("eos_token_id")):
        if tok not in eos:
            eos.append(tok)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_layers=int(text["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(text.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(text.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(
            cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        ),
        attention_bias=arch in ("qwen2", "qwen2_5_vl") or bool(text.get("attention_bias", False)),
        mlp_bias=bool(text.get("mlp_bias", False)),
        eos_token_ids=eos,
        bos_token_id=text.get("bos_token_id", cfg.get("bos_token_id")),
        mrope_section=mrope_section if arch == "qwen2_5_vl" else None,
        **(_vl_fields(cfg) if arch == "qwen2_5_vl" else {}),
    )


def _vl_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen2.5-VL's special token ids (top level in both layouts) and its vision tower."""
    vision = VisionConfig.from_hf(cfg["vision_config"])
    ids = {
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
    }  # transformers' defaults, used when config.json leaves an id out
    ids = {name: int(cfg.get(name, default)) for name, default in ids.items()}
    return {**ids, "spatial_merge_size": vision.spatial_merge_size, "vision": vision}
