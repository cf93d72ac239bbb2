"""Our paged Decoder (CPU, and CUDA where present) vs transformers on tiny random checkpoints:
greedy ids exact, logits close. Covers Qwen2 (GQA untied, MHA tied, sharded), Llama (llama3 and linear RoPE scaling), chunked prefill."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from devices.cuda import CudaPlatform
from models import load_model
from tests.fixtures.checkpoints import make_llama_checkpoint, make_qwen2_checkpoint
from tests.models.paged_runner import greedy_generate

torch.set_num_threads(2)

MAX_NEW = 8
PROMPTS = [
    [9707, 11, 1879, 0, 3555, 374, 279, 6722, 315, 9625, 30],
    [785, 3974, 13876, 38835],
    [40, 1075, 311, 8180, 13, 2585, 1525, 374, 432, 30, 220, 18, 10, 19, 28, 220, 22],
    [151644, 872, 198, 13048, 151645, 198, 151644, 77091],
]
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
CASES: dict[str, tuple[Callable[..., Path], dict[str, Any]]] = {
    "qwen2_gqa_untied": (make_qwen2_checkpoint, {}),
    "qwen2_mha_tied": (
        make_qwen2_checkpoint,
        {"num_key_value_heads": 4, "tie_word_embeddings": True},
    ),
    "qwen2_sharded": (make_qwen2_checkpoint, {"num_hidden_layers": 3, "max_shard_size": "20MB"}),
    "llama_gqa_llama3_rope": (
        make_llama_checkpoint,
        {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE},
    ),
    "llama_mha_linear_rope": (
        make_llama_checkpoint,
        {"num_key_value_heads": 4, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    make, overrides = CASES[request.param]
    path = make(tmp_path_factory.mktemp(request.param), **overrides)
    if request.param == "qwen2_sharded":
        assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy continuation and full-prompt logits, one unpadded prompt at a time."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    outputs, logits = [], []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False
            )
            outputs.append(out[0, len(prompt) :].tolist())
            logits.append(hf(ids).logits[0].float())
    return outputs, logits


CUDA = pytest.mark.skipif(
    not CudaPlatform().is_available(), reason="needs an NVIDIA GPU; none is available here"
)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("prefill_chunk", [None, 3])
def test_paged_greedy_matches_hf(
    checkpoint: Path,
    reference: tuple[list[list[int]], list[torch.Tensor]],
    prefill_chunk: int | None,
    device: str,
) -> None:
    """On CUDA: SDPA prefill, the Triton decode kernel and recorded (graph) decode steps."""
    model = load_model(str(checkpoint), torch.device(device), torch.float32)
    ours, our_logits = greedy_generate(model, PROMPTS, MAX_NEW, prefill_chunk=prefill_chunk)
    our_logits = [logits.cpu() for logits in our_logits]
    hf_outputs, hf_logits = reference
    for prompt, mine, theirs, ml, tl in zip(
        PROMPTS, ours, hf_outputs, our_logits, hf_logits, strict=True
    ):
        # HF stops at EOS; up to that point the greedy ids must be identical.
        assert mine[: len(theirs)] == theirs, f"prompt of {len(prompt)} tokens diverged"
        torch.testing.assert_close(ml, tl, atol=1e-4, rtol=1e-4)


def test_config_reads_generation_eos_and_rejects_unknown_arch(tmp_path: Path) -> None:
    import json

    from models.loader import load_hf_config

    path = make_qwen2_checkpoint(tmp_path / "q", num_hidden_layers=1)
    config = load_hf_config(path)
    assert config.architecture == "qwen2" and config.attention_bias
    assert config.eos_token_ids == [151643, 151645]
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_hf_config(path)
