"""Tensor parallelism on CPU (gloo, two executor processes): greedy outputs through the whole
engine equal transformers' (which TP 1 equals, tests/e2e/test_engine_matches_hf.py) for head
counts that split evenly, unevenly (3 query heads over 2 ranks, 1 KV head copied to both), with
tied embeddings over an odd vocabulary (each rank holds its rows of both) and with a
row-parallel bias, under chunked prefill, prefix caching and preemption, and for image requests
over HTTP."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e import test_vl_engine_matches_hf as vl
from tests.e2e.engine_process import EngineProcess
from tests.e2e.test_engine_matches_hf import engine_greedy, hf_greedy, random_prompts
from tests.fixtures.checkpoints import QWEN_VOCAB, make_llama_checkpoint, make_qwen2_checkpoint
from tests.fixtures.vl_checkpoint import make_qwen2_5_vl_checkpoint

TP2 = ["--tensor-parallel-size", "2", "--max-model-len", "96", "--threads", "1"]
CASES: dict[str, tuple[Callable[..., Path], dict[str, Any]]] = {
    "qwen2-4q-2kv": (make_qwen2_checkpoint, {}),
    "qwen2-3q-1kv-tied-odd-vocab": (  # 75968 / 75969 vocabulary rows, one tensor for both
        make_qwen2_checkpoint,
        {
            "num_attention_heads": 3,
            "num_key_value_heads": 1,
            "hidden_size": 48,
            "tie_word_embeddings": True,
            "vocab_size": QWEN_VOCAB + 1,
        },
    ),
    "llama-o-proj-bias-mlp-bias": (
        make_llama_checkpoint,
        {"attention_bias": True, "mlp_bias": True, "intermediate_size": 100},
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    make, overrides = CASES[request.param]
    return make(tmp_path_factory.mktemp(request.param) / "ckpt", **overrides)


def test_tp2_greedy_matches_transformers(checkpoint: Path) -> None:
    prompts = random_prompts(3, [5, 17, 33, 60, 9])
    expected = hf_greedy(checkpoint, prompts)
    # 16-token chunks, prefix caching on (the default), and a pool small enough to preempt
    # (6 blocks a rank: each holds half the KV heads, or one copied KV head)
    args = TP2 + ["--kv-cache-memory", str(3 * 8192), "--max-num-batched-tokens", "16"]
    eng = EngineProcess(str(checkpoint), args).start()
    try:
        got = engine_greedy(eng, prompts)
        log = eng.log()
        # and over HTTP: the completion of prompt 0's token ids is the same greedy text
        body = {"model": str(checkpoint), "prompt": prompts[0], "max_tokens": 12, "temperature": 0}
        answer = httpx.post(eng.base_url + "/completions", json=body | {"ignore_eos": True})
    finally:
        eng.stop()
    assert [g.token_ids for g in got] == expected
    assert "preempted" in log
    assert answer.status_code == 200
    assert answer.json()["usage"]["completion_tokens"] == 12


def test_tp2_images_chunks_and_prefix_cache_match_transformers(tmp_path: Path) -> None:
    ckpt = make_qwen2_5_vl_checkpoint(tmp_path / "vl")
    reference = vl.hf_reference(ckpt, ["one_image", "two_images", "text_only"], vl.NEW)
    waves = [["one_image"], ["one_image"], ["two_images", "text_only"]]
    args = ["--tensor-parallel-size", "2", "--kv-cache-memory", str(16 << 20)]
    results, _ = vl.run(ckpt, [*args, "--max-num-batched-tokens", "16"], waves)
    for wave, outs in zip(waves, results, strict=True):
        vl.check(wave, outs, reference)
    assert results[0][0].cached_tokens == 0 and results[1][0].cached_tokens >= 48


def test_uneven_head_groups_are_refused_at_start(tmp_path: Path) -> None:
    # 6 query heads over 4 ranks would give one rank query heads of two KV heads unevenly
    ckpt = make_qwen2_checkpoint(
        tmp_path / "ckpt", num_attention_heads=6, num_key_value_heads=3, hidden_size=96
    )
    eng = EngineProcess(str(ckpt), ["--tensor-parallel-size", "4", "--threads", "1"], http=False)
    with pytest.raises(RuntimeError, match="splits the 6 query heads"):
        eng.start(timeout=120)
