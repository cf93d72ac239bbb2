#!/usr/bin/env python3
"""Write a random-weight Qwen2.5-VL checkpoint in Hugging Face layout, for benchmarks and tests.

    python scripts/make_bench_checkpoint.py --out DIR --shape {tiny,bench,vlm-r1-3b}

Shapes:
  tiny       2 text layers (hidden 64, head_dim 16), 2 vision layers; float32, ~40 MB (mostly
             the 151936 x 64 embedding). For tests.
  bench      text tower shaped like Qwen2.5-0.5B (24 layers, hidden 896, 14 heads, 2 KV heads,
             intermediate 4864, vocab 151936, tied embeddings) and a 6-layer vision tower
             (hidden 640); bfloat16, ~1.1 GB.
  vlm-r1-3b  exactly the shapes of Qwen2.5-VL-3B-Instruct, which VLM-R1-Qwen2.5VL-3B-OVD
             fine-tunes (36 layers, hidden 2048, 16 heads, 2 KV heads, intermediate 11008; a
             32-layer vision tower of hidden 1280); bfloat16, 7.5 GB in two shards; ~8.5 GB of
             RAM and ~75 s on 2 cores to build.

The weights come from transformers' Qwen2_5_VLForConditionalGeneration built from the config
(its own random init, seeded by --seed) and written with save_pretrained, which uses the
published key names (model.*, visual.*); config.json is then rewritten in the published flat
layout, so the folder looks like the checkpoints on the hub. The tokenizer is the
real Qwen2.5 one (tests/assets/qwen2.5-tokenizer, or --tokenizer-dir), with the Qwen2.5-VL chat template; preprocessor_config.json is Qwen2.5-VL's.
Outputs are gibberish: the checkpoint is for measuring speed, not quality.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "tests" / "assets" / "qwen2.5-tokenizer"

# Qwen2.5 special token ids (the real tokenizer's).
ENDOFTEXT, IM_END = 151643, 151645
VISION_START, VISION_END, VISION_PAD, IMAGE_PAD, VIDEO_PAD = 151652, 151653, 151654, 151655, 151656

# Chat template of Qwen2.5-VL-*-Instruct (chat_template.json on the hub), shared with the tests.
QWEN25VL_CHAT_TEMPLATE = (REPO / "tests" / "assets" / "qwen2.5-vl-chat-template.jinja").read_text()

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            mrope_section=[2, 3, 3],  # head_dim 16 -> 8 rotary pairs
        ),
        vision=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, fullatt_block_indexes=[1]
        ),
        max_pixels=256 * 28 * 28,
        dtype="float32",
    ),
    "bench": dict(
        text=dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            mrope_section=[8, 12, 12],  # head_dim 64 -> 32 rotary pairs
        ),
        vision=dict(
            depth=6,
            hidden_size=640,
            intermediate_size=1728,
            num_heads=10,
            fullatt_block_indexes=[2, 5],
        ),
        max_pixels=12845056,
        dtype="bfloat16",
    ),
    "vlm-r1-3b": dict(
        text=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
            max_position_embeddings=128000,
            mrope_section=[16, 24, 24],  # head_dim 128 -> 64 rotary pairs
        ),
        vision=dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
        max_pixels=12845056,
        dtype="bfloat16",
    ),
}


def make_config(shape: str) -> dict[str, Any]:
    """config.json in the published Qwen2.5-VL layout (text fields flat, as on the hub)."""
    spec = SHAPES[shape]
    t, v = dict(spec["text"]), spec["vision"]
    mrope = t.pop("mrope_section")
    head_dim = t["hidden_size"] // t["num_attention_heads"]
    assert 2 * sum(mrope) == head_dim, (mrope, head_dim)
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "bos_token_id": ENDOFTEXT,
        "eos_token_id": IM_END,
        "vision_start_token_id": VISION_START,
        "vision_end_token_id": VISION_END,
        "vision_token_id": VISION_PAD,
        "image_token_id": IMAGE_PAD,
        "video_token_id": VIDEO_PAD,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_window_layers": 70 if shape == "vlm-r1-3b" else t["num_hidden_layers"],
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": spec["dtype"],
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
        **t,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope},
        "vision_config": {
            "hidden_act": "silu",
            "in_chans": 3,
            "out_hidden_size": t["hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "temporal_patch_size": 2,
            "tokens_per_second": 2,
            "window_size": 112,
            **v,
        },
    }


def preprocessor_config(shape: str) -> dict[str, Any]:
    return {
        "min_pixels": 3136,
        "max_pixels": SHAPES[shape]["max_pixels"],
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def find_tokenizer_dir(explicit: str | None) -> Path:
    candidates = [Path(explicit) if explicit else TOKENIZER_DIR]
    for d in candidates:
        if (d / "tokenizer.json").is_file() and (d / "tokenizer_config.json").is_file():
            return d
    sys.exit(
        "no Qwen2.5 tokenizer (tokenizer.json + tokenizer_config.json) in "
        + ", ".join(map(str, candidates))
    )


def write_weights(
    out: Path, cfg: dict[str, Any], dtype_name: str, seed: int, shard: str, device: str = "cpu"
) -> int:
    """Build the model from CFG with transformers' random init (run on DEVICE: "cuda" makes the
    3B shape in seconds) and save_pretrained it."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created (and initialised) in DTYPE directly
    try:
        with torch.no_grad(), torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**copy.deepcopy(cfg)))
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True, max_shard_size=shard)
    return n_params


def write_tokenizer(out: Path, src: Path) -> None:
    shutil.copy(src / "tokenizer.json", out / "tokenizer.json")
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_cfg["chat_template"] = QWEN25VL_CHAT_TEMPLATE
    tok_cfg["processor_class"] = "Qwen2_5_VLProcessor"
    (out / "tokenizer_config.json").write_text(
        json.dumps(tok_cfg, indent=2, ensure_ascii=False), encoding="utf-8"
    )
    template = {"chat_template": QWEN25VL_CHAT_TEMPLATE}
    (out / "chat_template.json").write_text(json.dumps(template, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="weight dtype (default: float32 for tiny, bfloat16 otherwise)",
    )
    ap.add_argument("--max-shard-size", default="4GB", help="save_pretrained's shard size")
    ap.add_argument("--tokenizer-dir", default=None, help="Qwen2.5 tokenizer folder to copy")
    ap.add_argument("--init-device", default="cpu", help="where the random init runs (cpu, cuda)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_src = find_tokenizer_dir(args.tokenizer_dir)
    dtype = args.dtype or SHAPES[args.shape]["dtype"]
    cfg = make_config(args.shape)
    cfg["torch_dtype"] = dtype
    t0 = time.time()
    n_params = write_weights(out, cfg, dtype, args.seed, args.max_shard_size, args.init_device)
    # save_pretrained writes transformers' own (nested) config.json; keep the published one.
    (out / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    gen = {
        "bos_token_id": ENDOFTEXT,
        "pad_token_id": ENDOFTEXT,
        "eos_token_id": [IM_END, ENDOFTEXT],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(args.shape), indent=2), encoding="utf-8"
    )
    write_tokenizer(out, tok_src)
    print(
        f"{out}: {args.shape} Qwen2.5-VL, {n_params / 1e6:.1f}M params ({dtype}), "
        f"tokenizer from {tok_src}, {time.time() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
