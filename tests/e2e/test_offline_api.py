"""The offline API starts its own engine and returns the same greedy tokens as the server path."""

from __future__ import annotations

from pathlib import Path

from protocols.offline import LLM, SamplingParams


def test_offline_generate_and_chat(tiny_qwen2: Path) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with LLM(str(tiny_qwen2), max_model_len=128, kv_cache_memory=8 << 20, threads=1) as llm:
        outs = llm.generate(["Hello, world", "A longer prompt about the sea and the sky"], params)
        again = llm.generate(["Hello, world"], params)
        ids = llm.generate([[9707, 11, 1879]], params)
        chat = llm.chat([{"role": "user", "content": "Hi"}], params)
    assert len(outs) == 2 and all(len(o.token_ids) == 6 for o in outs)
    assert again[0].token_ids == outs[0].token_ids  # greedy: alone == in a batch
    assert ids[0].token_ids == outs[0].token_ids  # "Hello, world" is [9707, 11, 1879]
    assert chat[0].prompt_tokens > 3 and chat[0].finish_reason == "length"
    assert isinstance(outs[0].text, str) and outs[0].text
