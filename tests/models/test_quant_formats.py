"""Pre-quantized checkpoints (models/quant/formats.py) on tiny random Qwen2 / Llama models, one per
format: GPTQ 4/8-bit (groups, act-order, symmetric and not), AWQ GEMM, compressed-tensors (W4A16
sym / asym, W8A8, FP8 per-tensor / per-channel / block) and transformers' block fp8.

Each is checked three ways: the portable QuantizedLinear (fp32) against transformers running the
dequantized weights the writer meant (exact); against transformers loading the quantized checkpoint
itself where it can; and the CPU kernels (bf16) against the portable layers (close, same greedy
tokens on most positions)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from devices.cpu import CpuPlatform
from devices.cpu_features import has_native_bf16
from models import load_model
from models.quant.linear import QuantizedLinear, fake_quant
from tests.fixtures.checkpoints import make_llama_checkpoint, make_qwen2_checkpoint
from tests.fixtures.quant_checkpoints import (
    write_awq,
    write_compressed_tensors,
    write_fp8_blocks,
    write_gptq,
)
from tests.models.paged_runner import greedy_generate
from tests.models.test_quantized_linear import PortableCpu

torch.set_num_threads(2)

MAX_NEW = 8
PROMPTS = [[97, 11, 879, 0, 355, 374, 279, 672, 315, 962, 30], [785, 397, 138, 388]]
SHAPE: dict[str, Any] = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4
)
Writer = Callable[[Path, Path], dict[str, torch.Tensor]]
CASES: dict[str, tuple[str, Writer, bool]] = {  # name: (family, writer, transformers loads it)
    "gptq_4bit_g32_sym": ("qwen2", lambda s, o: write_gptq(s, o, 4, 32), False),
    "gptq_4bit_act_order_asym": (
        "llama",
        lambda s, o: write_gptq(s, o, 4, 32, act_order=True, sym=False),
        False,
    ),
    "gptq_8bit_channel_sym": ("qwen2", lambda s, o: write_gptq(s, o, 8, -1), False),
    "gptq_8bit_g64_asym": ("qwen2", lambda s, o: write_gptq(s, o, 8, 64, sym=False), False),
    "awq_gemm_g32": ("qwen2", lambda s, o: write_awq(s, o, 32), False),
    "ct_w4a16": ("qwen2", lambda s, o: write_compressed_tensors(s, o, "W4A16"), True),
    "ct_w4a16_asym": ("llama", lambda s, o: write_compressed_tensors(s, o, "W4A16_ASYM"), False),
    "ct_w8a8": ("qwen2", lambda s, o: write_compressed_tensors(s, o, "W8A8"), True),
    "ct_fp8_tensor": ("qwen2", lambda s, o: write_compressed_tensors(s, o, "FP8_TENSOR"), True),
    "ct_fp8_channel": ("qwen2", lambda s, o: write_compressed_tensors(s, o, "FP8_DYNAMIC"), True),
    "ct_fp8_block": ("qwen2", lambda s, o: write_compressed_tensors(s, o, "FP8_BLOCK"), True),
    "fp8_block": ("qwen2", write_fp8_blocks, False),
}


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dense")
    return {
        "qwen2": make_qwen2_checkpoint(root / "qwen2", **SHAPE, num_key_value_heads=2),
        "llama": make_llama_checkpoint(root / "llama", **SHAPE, num_key_value_heads=2),
    }


def hf_with(dense_dir: Path, weights: dict[str, torch.Tensor], act_quant: str) -> Any:
    """transformers' model of the dense checkpoint with `weights` (HF names) written in, the
    inputs of its layers' linears rounded as the checkpoint's activation scheme says (the same
    rounding is checked against transformers' own compressed-tensors load in the ct cases)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, w in weights.items():
            params[name].copy_(w)
    for name, module in hf.named_modules():
        if act_quant != "none" and isinstance(module, nn.Linear) and ".layers." in name:
            module.register_forward_pre_hook(lambda _, args: (fake_quant(args[0], act_quant),))
    return hf


def hf_logits(hf: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0] for p in PROMPTS]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_format_matches_reference(
    case: str,
    dense: dict[str, Path],
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    family, write, hf_loads = CASES[case]
    meant = write(dense[family], tmp_path / case)
    model = load_model(str(tmp_path / case), torch.device("cpu"), torch.float32)
    assert isinstance(model.layers[1].self_attn.qkv_proj, QuantizedLinear)
    ids, logits = greedy_generate(model, PROMPTS, MAX_NEW, platform=PortableCpu())
    act_quant = model.layers[1].self_attn.qkv_proj.act_quant
    refs = [hf_logits(hf_with(dense[family], meant, act_quant))]
    if hf_loads:
        direct = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / case, dtype=torch.float32
        ).eval()
        refs.append(hf_logits(direct))
    for i, ref in enumerate(refs):
        for mine, theirs in zip(logits, ref, strict=True):
            if i == 1 and act_quant == "int8_token":  # transformers runs W8A8 decompressed,
                assert (mine - theirs).abs().max() <= 0.08 * theirs.abs().max()  # dense x
            else:
                torch.testing.assert_close(mine, theirs, atol=2e-4, rtol=1e-4)
    if has_native_bf16():  # the CPU kernels (bf16; prompts this short use the packed ones)
        _, fast_logits = greedy_generate(model, PROMPTS, MAX_NEW, platform=CpuPlatform())
        fast_top = [row.argmax(-1).tolist() for row in fast_logits]
        agreed = agreement(fast_top, [row.argmax(-1).tolist() for row in logits])
        error = max(
            float((f - p).abs().max() / p.abs().max())
            for f, p in zip(fast_logits, logits, strict=True)
        )
        record_property("cpu_kernel_agreement", round(agreed, 3))  # README's table
        record_property("cpu_kernel_logit_error", round(error, 4))
        assert agreed >= 0.8
        assert error <= 0.05


def test_forced_format_must_match_the_checkpoint(dense: dict[str, Path], tmp_path: Path) -> None:
    write_awq(dense["qwen2"], tmp_path / "awq", 32)
    with pytest.raises(ValueError, match="quantized by awq"):
        load_model(str(tmp_path / "awq"), torch.device("cpu"), torch.float32, quantization="gptq")
    with pytest.raises(ValueError, match="already awq"):
        load_model(str(tmp_path / "awq"), torch.device("cpu"), torch.float32, quantization="int8")
    with pytest.raises(ValueError, match="no quantization_config"):
        load_model(str(dense["qwen2"]), torch.device("cpu"), torch.float32, quantization="awq")
    model = load_model(
        str(tmp_path / "awq"), torch.device("cpu"), torch.float32, quantization="awq"
    )
    assert isinstance(model.layers[0].mlp.down_proj, QuantizedLinear)
