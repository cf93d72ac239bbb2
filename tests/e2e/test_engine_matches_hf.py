"""Greedy outputs through the whole engine (real processes and sockets) equal transformers',
whatever the scheduling: many prefill chunks, prefix caching on or off, preemption, concurrency."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from protocols.client import EngineClient
from protocols.messages import GenerateRequest, SamplingParams
from tests.e2e.engine_process import EngineProcess
from tests.fixtures.checkpoints import make_llama_checkpoint, make_qwen2_checkpoint

NEW_TOKENS = 12


def hf_greedy(ckpt: Path, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = model.generate(
                torch.tensor([p]),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(ids[0, len(p) :].tolist())
    return outs


def engine_greedy(eng: EngineProcess, prompts: list[list[int]]) -> list:
    with EngineClient(eng.front) as client:
        client.wait_ready(60)
        reqs = [
            GenerateRequest(
                f"r{i}-{random.random()}",
                prompt_token_ids=p,
                sampling=SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
            )
            for i, p in enumerate(prompts)
        ]
        return client.complete_many(reqs)


def random_prompts(seed: int, lengths: list[int], prefix: list[int] | None = None):
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(0, 150000) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_checkpoint(tmp_path_factory.mktemp("q") / "qwen2", num_key_value_heads=2)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("l") / "llama",
        tie_word_embeddings=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )


BASE = ["--max-model-len", "128", "--threads", "1"]
SETTINGS = {
    "defaults": ["--kv-cache-memory", str(8 << 20)],
    "chunked-16-no-prefix-cache": [
        "--kv-cache-memory",
        str(8 << 20),
        "--max-num-batched-tokens",
        "16",
        "--no-enable-prefix-caching",
    ],
    "tiny-pool-preempts": ["--kv-cache-memory", str(10 * 8192), "--max-num-batched-tokens", "32"],
    "max-num-seqs-2": ["--kv-cache-memory", str(8 << 20), "--max-num-seqs", "2"],
}


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_qwen2_batch_matches_transformers(qwen2: Path, setting: str) -> None:
    prompts = random_prompts(1, [5, 17, 33, 60, 9])
    expected = hf_greedy(qwen2, prompts)
    eng = EngineProcess(str(qwen2), BASE + SETTINGS[setting], http=False).start()
    try:
        got = engine_greedy(eng, prompts)
        log = eng.log()
    finally:
        eng.stop()
    assert [g.token_ids for g in got] == expected
    assert all(
        g.finish_reason == "length" and g.prompt_tokens == len(p) for g, p in zip(got, prompts)
    )
    if setting == "tiny-pool-preempts":
        assert "preempted" in log


def test_llama_with_rope_scaling_and_shared_prefix_cache(llama: Path) -> None:
    prefix = random_prompts(7, [40])[0]
    prompts = random_prompts(2, [3, 11, 20], prefix=prefix)
    expected = hf_greedy(llama, prompts)
    eng = EngineProcess(str(llama), BASE + ["--kv-cache-memory", str(8 << 20)], http=False).start()
    try:
        first = engine_greedy(eng, prompts[:1])
        rest = engine_greedy(eng, prompts[1:])
    finally:
        eng.stop()
    got = first + rest
    assert [g.token_ids for g in got] == expected
    assert first[0].cached_tokens == 0
    assert all(g.cached_tokens >= 32 for g in rest)  # two full 16-token blocks of the prefix
