"""Quantize-at-load (`--quantization int8|int4`, models/quant/methods.py) on tiny Qwen2 / Llama
checkpoints: the portable QuantizedLinear matches transformers running the same dequantized
weights (fp32, exact), and the CPU kernels (bf16) stay close with the same greedy tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

from devices.cpu import CpuPlatform
from devices.cpu_features import has_native_bf16
from models import load_model
from models.quant.linear import QuantizedLinear, dequantize, pack_int4, unpack_int4
from models.quant.methods import quantize_int4, quantize_int8
from models.quant.spec import weight_bytes
from tests.fixtures.checkpoints import make_llama_checkpoint, make_qwen2_checkpoint
from tests.models.paged_runner import greedy_generate

torch.set_num_threads(2)

MAX_NEW = 8
PROMPTS = [[9707, 11, 1879, 0, 3555, 374, 279, 6722, 315, 9625, 30], [785, 3974, 13876, 38835]]


class PortableCpu(CpuPlatform):
    """The CPU platform without its kernels: every layer runs its own (reference) forward."""

    def prepare_model(self, model: nn.Module) -> None:
        pass


def test_int4_pack_round_trips_and_rounding_is_bounded() -> None:
    values = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(values)), values)
    w = torch.randn(64, 96)
    q, scales = quantize_int8(w)
    assert (dequantize(q, scales, None, 8) - w).abs().le(scales / 2 + 1e-6).all()
    packed, scales, offsets = quantize_int4(w, 32)
    err = (dequantize(packed, scales, offsets, 4) - w).view(64, 3, 32).abs()
    assert err.le(scales.unsqueeze(-1) / 2 + 1e-6).all()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    make = make_qwen2_checkpoint if request.param == "qwen2" else make_llama_checkpoint
    return make(tmp_path_factory.mktemp(request.param), tie_word_embeddings=True)


def hf_with_weights_of(checkpoint: Path, ours: Any) -> Any:
    """transformers' model whose linears hold our dequantized weights (what ours computes)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    hf.config.tie_word_embeddings = False
    hf.lm_head.weight = nn.Parameter(hf.lm_head.weight.detach().clone())
    sizes = {"q": 64, "k": 32, "v": 32, "gate": 128, "up": 128}
    with torch.no_grad():
        hf.lm_head.weight.copy_(ours.lm_head.dequantized_weight(torch.float32))
        for mine, theirs in zip(ours.layers, hf.model.layers, strict=True):
            qkv = mine.self_attn.qkv_proj.dequantized_weight(torch.float32).split(
                [sizes["q"], sizes["k"], sizes["v"]]
            )
            gate_up = mine.mlp.gate_up_proj.dequantized_weight(torch.float32).split(128)
            for name, w in zip(("q_proj", "k_proj", "v_proj"), qkv, strict=True):
                getattr(theirs.self_attn, name).weight.copy_(w)
            theirs.self_attn.o_proj.weight.copy_(
                mine.self_attn.o_proj.dequantized_weight(torch.float32)
            )
            theirs.mlp.gate_proj.weight.copy_(gate_up[0])
            theirs.mlp.up_proj.weight.copy_(gate_up[1])
            theirs.mlp.down_proj.weight.copy_(mine.mlp.down_proj.dequantized_weight(torch.float32))
    return hf


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantize_at_load_matches_hf_on_the_same_weights(checkpoint: Path, method: str) -> None:
    dense = load_model(str(checkpoint), torch.device("cpu"), torch.float32)
    model = load_model(str(checkpoint), torch.device("cpu"), torch.float32, quantization=method)
    assert isinstance(model.layers[0].mlp.gate_up_proj, QuantizedLinear)
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.bits == 8
    layer_bytes = sum(weight_bytes(layer) for layer in model.layers)
    dense_bytes = sum(weight_bytes(layer) for layer in dense.layers)
    assert layer_bytes < dense_bytes * (0.4 if method == "int4" else 0.3)
    hf = hf_with_weights_of(checkpoint, model)
    ours, our_logits = greedy_generate(model, PROMPTS, MAX_NEW, platform=PortableCpu())
    with torch.no_grad():
        for prompt, ids, logits in zip(PROMPTS, ours, our_logits, strict=True):
            ref = hf(torch.tensor([prompt])).logits[0]
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False)
            assert ids == out[0, len(prompt) :].tolist()


@pytest.mark.skipif(not has_native_bf16(), reason="the CPU kernels compute in native bf16")
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_cpu_kernels_agree_with_the_portable_layers(checkpoint: Path, method: str) -> None:
    model = load_model(str(checkpoint), torch.device("cpu"), torch.float32, quantization=method)
    ref_ids, ref_logits = greedy_generate(model, PROMPTS, MAX_NEW, platform=PortableCpu())
    ids, logits = greedy_generate(model, PROMPTS, MAX_NEW, platform=CpuPlatform())
    assert not isinstance(model.layers[0].mlp.gate_up_proj, QuantizedLinear)  # kernels swapped in
    same = sum(
        a == b
        for mine, ref in zip(ids, ref_ids, strict=True)
        for a, b in zip(mine, ref, strict=True)
    )
    assert same >= 0.9 * MAX_NEW * len(PROMPTS)
    for mine, ref in zip(logits, ref_logits, strict=True):
        assert (mine - ref).abs().max() <= 0.03 * ref.abs().max()


def test_quantization_with_tensor_parallelism_is_refused(checkpoint: Path) -> None:
    from models.parallel import TensorParallel

    with pytest.raises(ValueError, match="tensor parallelism"):
        load_model(
            str(checkpoint), torch.device("cpu"), torch.float32, TensorParallel(0, 2), "int8"
        )


def test_runner_reports_weight_and_kv_bytes(checkpoint: Path) -> None:
    """What the executor's start-up log prints (`weight_bytes`, `kv_bytes`)."""
    from actors.execution import KVLimits, ModelRunner
    from models.attention import kv_cache_bytes_per_block

    limits = KVLimits(max_model_len=64, max_num_seqs=2)
    runners = {
        q: ModelRunner.load(
            str(checkpoint), PortableCpu(), dtype="float32", limits=limits, quantization=q
        )
        for q in ("none", "int8")
    }
    dense, quantized = runners["none"], runners["int8"]
    fresh = load_model(str(checkpoint), torch.device("cpu"), torch.float32)
    tensors = {id(t): t for t in [*fresh.parameters(), *fresh.buffers()]}  # buffers: rotary
    assert dense.weight_bytes == 4 * sum(t.numel() for t in tensors.values())
    int8 = load_model(str(checkpoint), torch.device("cpu"), torch.float32, quantization="int8")
    assert quantized.weight_bytes == weight_bytes(int8)  # as stored, before the CPU repacks
    per_block = kv_cache_bytes_per_block(dense.model.config, dense.pool.block_size, torch.float32)
    assert dense.kv_bytes == (dense.pool.num_blocks + 1) * per_block  # + the scratch block
