"""`echo` with prompt logprobs on /v1/completions (what lm-eval's local-completions
log-likelihood requests send) and vLLM's `prompt_logprobs`, through the whole engine with the
official openai client, against transformers' log-softmax of the prompt."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from protocols.client import EngineClient, new_request

HELLO_IDS = [9707, 11, 1879, 0, 3555, 374, 279, 6722, 315]


def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def hf_token_logprobs(ckpt: Path, prompt: list[int]) -> list[float]:
    """transformers' logprob of each prompt token 1..L-1 given the ones before it."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.inference_mode():
        logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), dim=-1)
    return [logprobs[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]


def lm_eval_request(server: Any, prompt: str | list[int]) -> Any:
    """What lm-eval's local-completions sends for a log-likelihood request."""
    return client(server).completions.create(
        model=server.model,
        prompt=prompt,
        max_tokens=1,
        temperature=0,
        logprobs=1,
        echo=True,
        seed=1234,
    )


def test_echo_gives_the_prompt_logprobs_of_transformers(server: Any, tiny_qwen2: Path) -> None:
    want = hf_token_logprobs(tiny_qwen2, HELLO_IDS)
    for attempt in range(2):  # the second time the prompt's blocks are in the prefix cache
        r = lm_eval_request(server, HELLO_IDS)
        choice = r.choices[0]
        lp = choice.logprobs
        n = len(HELLO_IDS) + 1
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None, attempt
        assert lp.token_logprobs[1:-1] == pytest.approx(want, abs=1e-4), attempt
        for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert top[token] == pytest.approx(value) and value <= max(top.values())
        prompt_text = "".join(lp.tokens[:-1])
        assert choice.text.startswith(prompt_text) and choice.text.endswith(lp.tokens[-1])
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        assert lp.text_offset[-1] == len(prompt_text)
        assert r.usage.prompt_tokens == len(HELLO_IDS)


def test_echo_of_a_text_prompt_starts_with_the_prompt(server: Any) -> None:
    by_text = lm_eval_request(server, "Hello, world!")
    by_ids = lm_eval_request(server, HELLO_IDS[:4])
    assert by_text.choices[0].text.startswith("Hello, world!")
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.choices[0].logprobs.token_logprobs == pytest.approx(
        by_ids.choices[0].logprobs.token_logprobs
    )
    plain = client(server).completions.create(
        model=server.model, prompt="Hello, world!", max_tokens=3, temperature=0, echo=True
    )
    assert plain.choices[0].text.startswith("Hello, world!") and plain.choices[0].logprobs is None


def test_streamed_echo_sends_the_prompt_first(server: Any) -> None:
    kw: dict[str, Any] = dict(
        model=server.model,
        prompt="Once upon a time",
        max_tokens=4,
        temperature=0,
        logprobs=1,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    want = client(server).completions.create(**kw).choices[0]
    chunks = [ch for ch in client(server).completions.create(stream=True, **kw) if ch.choices]
    assert chunks[0].choices[0].text.startswith("Once upon a time")
    assert "".join(ch.choices[0].text for ch in chunks) == want.text
    got: list[float | None] = []
    for ch in chunks:
        if ch.choices[0].logprobs is not None:
            got += ch.choices[0].logprobs.token_logprobs
    assert got[0] is None
    assert got[1:] == pytest.approx(want.logprobs.token_logprobs[1:])


def test_vllm_prompt_logprobs_field(server: Any, tiny_qwen2: Path) -> None:
    r = client(server).completions.create(
        model=server.model,
        prompt=HELLO_IDS,
        max_tokens=2,
        temperature=0,
        extra_body={"prompt_logprobs": 2},
    )
    extra = r.choices[0].model_extra
    assert extra is not None
    field = extra["prompt_logprobs"]
    assert len(field) == len(HELLO_IDS) and field[0] is None
    want = hf_token_logprobs(tiny_qwen2, HELLO_IDS)
    for i, entry in enumerate(field[1:]):
        mine = entry[str(HELLO_IDS[i + 1])]
        assert mine["logprob"] == pytest.approx(want[i], abs=1e-4) and mine["rank"] >= 1
        assert 1 <= len(entry) <= 3
        assert sorted(e["rank"] for e in entry.values())[:1] == [1]
    assert r.choices[0].text and not r.choices[0].text.startswith("Hello")


def test_chat_echo_and_bad_prompt_logprobs_are_400(server: Any) -> None:
    c = client(server)
    with pytest.raises(openai.BadRequestError, match="echo"):
        c.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"echo": True},
        )
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        c.completions.create(
            model=server.model, prompt="hi", max_tokens=1, extra_body={"prompt_logprobs": 10**6}
        )


def test_sdk_request_output_carries_prompt_logprobs(server: Any, tiny_qwen2: Path) -> None:
    with EngineClient(server.engine.front) as sdk:
        req = new_request(
            prompt_token_ids=HELLO_IDS, max_tokens=2, temperature=0, prompt_logprobs=1
        )
        out = sdk.complete(req)
    assert out.prompt_token_ids == HELLO_IDS and out.prompt_logprobs is not None
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(HELLO_IDS)
    got = [p.sampled.logprob for p in out.prompt_logprobs[1:] if p is not None]
    assert got == pytest.approx(hf_token_logprobs(tiny_qwen2, HELLO_IDS), abs=1e-4)
    assert out.prompt_token_strs is not None and len(out.prompt_token_strs) == len(HELLO_IDS)
