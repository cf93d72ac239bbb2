"""A Qwen2.5-VL checkpoint whose language model is GPTQ-quantized (vision tower left in fp32, as
published quantized VL checkpoints do): text and image requests against transformers running the
same dequantized weights (portable layers, exact), and on the CPU kernels (close)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from devices.cpu import CpuPlatform
from devices.cpu_features import has_native_bf16
from models import load_model
from models.quant.linear import QuantizedLinear
from models.qwen2_5_vl import Qwen2_5_VLModel
from tests.fixtures.quant_checkpoints import write_gptq
from tests.fixtures.vl_checkpoint import make_qwen2_5_vl_checkpoint
from tests.models.test_quantized_linear import PortableCpu
from tests.models.test_qwen2_5_vl_matches_hf import Case
from tests.models.test_qwen2_5_vl_matches_hf import cases as cases  # noqa: F401 - a fixture
from tests.models.vl_runner import vl_greedy_generate

torch.set_num_threads(2)
MAX_NEW = 6
NAMES = ["one_image", "text_only"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("vl"), nested=True)


@pytest.fixture(scope="module")
def quantized(dense: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("vl_gptq")
    return out, write_gptq(dense, out, 4, 32, act_order=True, sym=False)


@pytest.fixture(scope="module")
def checkpoint(quantized: tuple[Path, Any]) -> Path:
    return quantized[0]  # the `cases` fixture reads its tokenizer and processor


@pytest.fixture(scope="module")
def prompts(request: pytest.FixtureRequest) -> dict[str, Case]:
    """The chat-templated text and image prompts of test_qwen2_5_vl_matches_hf (its `cases`)."""
    found: dict[str, Case] = request.getfixturevalue("cases")
    return found


@pytest.fixture(scope="module")
def reference(
    dense: Path, quantized: tuple[Path, Any], prompts: dict[str, Case]
) -> dict[str, tuple[list[int], torch.Tensor]]:
    cls = transformers.Qwen2_5_VLForConditionalGeneration
    hf = cls.from_pretrained(dense, dtype=torch.float32).eval()
    params = dict(hf.named_parameters())
    ref = {}
    with torch.no_grad():
        for name, w in quantized[1].items():  # checkpoint names -> transformers' module names
            params[name.replace("model.layers.", "model.language_model.layers.")].copy_(w)
        for name in NAMES:
            inputs = prompts[name].hf_inputs
            out = hf.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
            logits = hf(**inputs).logits[0].float()
            ref[name] = (out[0, inputs["input_ids"].shape[1] :].tolist(), logits)
    return ref


def test_quantized_language_model_matches_hf_text_and_image(
    checkpoint: Path,
    prompts: dict[str, Case],
    reference: dict[str, tuple[list[int], torch.Tensor]],
) -> None:
    model: Any = load_model(str(checkpoint), torch.device("cpu"), torch.float32)
    assert isinstance(model, Qwen2_5_VLModel)
    layer: Any = model.layers[0]
    assert isinstance(layer.mlp.gate_up_proj, QuantizedLinear)
    assert not any(isinstance(m, QuantizedLinear) for m in model.visual.modules())
    chosen = [prompts[n].prompt for n in NAMES]
    ids, logits = vl_greedy_generate(model, chosen, MAX_NEW, platform=PortableCpu())
    for name, mine, mine_logits in zip(NAMES, ids, logits, strict=True):
        theirs, their_logits = reference[name]
        assert mine[: len(theirs)] == theirs, name
        torch.testing.assert_close(mine_logits, their_logits, atol=2e-4, rtol=1e-4)
    if has_native_bf16():
        fast, fast_logits = vl_greedy_generate(model, chosen, MAX_NEW, platform=CpuPlatform())
        same = sum(
            a == b for x, y in zip(fast, ids, strict=True) for a, b in zip(x, y, strict=True)
        )
        assert same >= 0.8 * MAX_NEW * len(NAMES), (fast, ids)
        for mine_logits, ref in zip(fast_logits, logits, strict=True):
            assert (mine_logits - ref).abs().max() <= 0.05 * ref.abs().max()
