"""End-to-end tests of the OpenAI-compatible HTTP API against a real engine on a tiny checkpoint.

HTTP client -> OpenAI adapter -> gateway -> tokenizer -> scheduler -> executor -> detokenizer -> back.
Fixtures `server` / `server_with_key` (tests/e2e/conftest.py): .base_url (".../v1"), .model,
.api_key; a random-weight Qwen2 with the real Qwen2.5 tokenizer and max_model_len 256.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from protocols.client import EngineClient, new_request

HELLO_IDS = [9707, 11, 1879, 0]  # "Hello, world!" in the Qwen2.5 tokenizer
GREEDY: dict[str, Any] = {"temperature": 0.0}


def client(server: Any, api_key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=120)


def root(server: Any) -> str:
    return server.base_url.removesuffix("/v1")


def chat_once(server: Any, content: str, max_tokens: int = 12, **kw: Any) -> Any:
    return client(server).chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        extra_body={"ignore_eos": True, **kw.pop("extra_body", {})},
        **GREEDY,
        **kw,
    )


def test_chat_greedy_returns_content_and_usage(server):
    r = chat_once(server, "Say something.", max_tokens=10)
    choice = r.choices[0]
    assert (
        r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == server.model
    )
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.content != ""
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10


def test_chat_greedy_is_deterministic(server):
    a = chat_once(server, "Repeat after me.").choices[0].message.content
    b = chat_once(server, "Repeat after me.").choices[0].message.content
    assert a == b


def test_chat_stream_matches_non_stream(server):
    want = chat_once(server, "Tell me a story.", max_tokens=16)
    stream = client(server).chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 16
    assert last.usage.prompt_tokens == want.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_text_and_token_id_prompts_agree(server):
    c = client(server)
    kw: dict[str, Any] = dict(
        model=server.model, max_tokens=8, extra_body={"ignore_eos": True}, **GREEDY
    )
    by_text = c.completions.create(prompt="Hello, world!", **kw)
    by_ids = c.completions.create(prompt=HELLO_IDS, **kw)
    assert by_text.id.startswith("cmpl-") and by_text.object == "text_completion"
    assert by_ids.usage.prompt_tokens == len(HELLO_IDS)
    assert by_text.usage.prompt_tokens == len(HELLO_IDS)
    assert by_text.usage.completion_tokens == by_ids.usage.completion_tokens == 8
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.choices[0].finish_reason == "length"


def test_completion_stream_matches_non_stream(server):
    c = client(server)
    kw: dict[str, Any] = dict(
        model=server.model,
        prompt="Once upon a time",
        max_tokens=12,
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    want = c.completions.create(**kw).choices[0].text
    got = "".join(
        ch.choices[0].text for ch in c.completions.create(stream=True, **kw) if ch.choices
    )
    assert got == want


def test_chat_logprobs_shape(server):
    r = chat_once(server, "Logprobs please.", max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0.0 and isinstance(entry.token, str)
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy takes the top token
    plain = chat_once(server, "Logprobs please.", max_tokens=5)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_shape(server):
    r = client(server).completions.create(
        model=server.model,
        prompt="Count: 1, 2,",
        max_tokens=4,
        logprobs=2,
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert len(lp.text_offset) == 4 and lp.text_offset[0] == 0
    assert lp.text_offset == sorted(lp.text_offset)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0.0 and 1 <= len(top) <= 3
        assert value == pytest.approx(max(top.values()), abs=1e-5)
        assert token in top


def _stop_candidate(text: str) -> str:
    """A short piece from the middle of `text` to use as a stop string."""
    for start in range(len(text) // 3, len(text) - 2):
        piece = text[start : start + 2]
        if piece.strip() and "\ufffd" not in piece:
            return piece
    pytest.skip(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_truncates(server, include):
    full = chat_once(server, "Write a long line.", max_tokens=24).choices[0].message.content
    stop = _stop_candidate(full)
    at = full.index(stop)
    r = chat_once(
        server,
        "Write a long line.",
        max_tokens=24,
        stop=[stop],
        extra_body={"include_stop_str_in_output": include},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: at + len(stop) if include else at]


def test_models_lists_the_served_name(server):
    ids = [m.id for m in client(server).models.list().data]
    assert server.model in ids
    body = httpx.get(f"{server.base_url}/models").json()
    card = next(m for m in body["data"] if m["id"] == server.model)
    assert card["owned_by"] == "tessera" and card["max_model_len"] == 256


def test_health_and_version(server):
    assert httpx.get(f"{root(server)}/health").status_code == 200
    assert httpx.get(f"{root(server)}/version").json()["version"]


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        client(server).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert e.value.status_code == 404
    assert "does not exist" in str(e.value)


def test_bad_temperature_is_400_with_error_body(server):
    r = httpx.post(
        f"{server.base_url}/chat/completions",
        json={
            "model": server.model,
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": -1.0,
        },
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400
    assert err["param"] == "temperature" and err["message"]
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "hi"}], temperature=-1.0
        )


def test_prompt_longer_than_context_is_400(server):
    c = client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model=server.model, prompt=[9707] * 300, max_tokens=4)
    assert e.value.status_code == 400 and "context length" in str(e.value).lower()
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model=server.model, max_tokens=4, messages=[{"role": "user", "content": "hello " * 400}]
        )
    assert "context length" in str(e.value).lower()


def test_prompt_longer_than_context_is_400_when_streaming(server):
    r = httpx.post(
        f"{server.base_url}/completions",
        json={"model": server.model, "prompt": [9707] * 300, "max_tokens": 4, "stream": True},
    )
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"].lower()


def test_n_out_of_range_is_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=0
        )
    assert e.value.status_code == 400


def test_dropped_stream_is_aborted_and_engine_keeps_serving(server):
    with httpx.stream(
        "POST",
        f"{server.base_url}/chat/completions",
        timeout=60,
        json={
            "model": server.model,
            "stream": True,
            "max_tokens": 200,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": "Go on forever."}],
        },
    ) as r:
        assert r.status_code == 200
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    assert chat_once(server, "Still there?", max_tokens=3).usage.completion_tokens == 3


def test_errors_leave_the_engine_serving(server):
    c = client(server)
    for bad in ({"model": "nope"}, {"temperature": -2.0}, {"n": 0}):
        with pytest.raises(openai.APIStatusError):
            c.chat.completions.create(
                **{
                    "model": server.model,
                    "max_tokens": 2,
                    "messages": [{"role": "user", "content": "x"}],
                    **bad,
                }
            )
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=server.model, prompt=[9707] * 300, max_tokens=2)
    r = chat_once(server, "Are you fine?", max_tokens=4)
    assert r.usage.completion_tokens == 4 and r.choices[0].message.content


PROMPTS = [
    f"Prompt number {i}: tell me about {topic}."
    for i, topic in enumerate(
        ["cats", "the sea", "mountains", "bread", "rain", "chess", "music", "trains"]
    )
]


def test_concurrent_clients_match_sequential(server):
    def complete(prompt: str) -> str:
        r = client(server).completions.create(
            model=server.model,
            prompt=prompt,
            max_tokens=16,
            extra_body={"ignore_eos": True},
            **GREEDY,
        )
        assert r.usage.completion_tokens == 16
        return r.choices[0].text

    sequential = [complete(p) for p in PROMPTS]
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        concurrent = list(pool.map(complete, PROMPTS))
    assert concurrent == sequential


def test_api_key_required(server_with_key):
    base = server_with_key.base_url
    body = {
        "model": server_with_key.model,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": "hi"}],
    }
    r = httpx.post(f"{base}/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == 401
    assert httpx.get(f"{base}/models").status_code == 401
    bad = httpx.post(
        f"{base}/chat/completions", json=body, headers={"Authorization": "Bearer wrong"}
    )
    assert bad.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(server_with_key, api_key="wrong").models.list()
    ok = httpx.post(
        f"{base}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {server_with_key.api_key}"},
    )
    assert ok.status_code == 200 and ok.json()["usage"]["prompt_tokens"] > 0
    assert httpx.get(f"{root(server_with_key)}/health").status_code == 200
    models = client(server_with_key, api_key=server_with_key.api_key).models.list()
    assert server_with_key.model in [m.id for m in models.data]


# ---------------------------------------------------------------- logit_bias


def greedy_ids(server: Any, prompt_ids: list[int], n: int, **sampling: Any) -> list[int]:
    """The engine's greedy token ids for a prompt, through the ZMQ SDK (HTTP shows only text)."""
    with EngineClient(server.engine.front) as sdk:
        req = new_request(
            prompt_token_ids=prompt_ids, max_tokens=n, temperature=0, ignore_eos=True, **sampling
        )
        return sdk.complete(req).token_ids


def detokenize(server: Any, ids: list[int]) -> str:
    r = httpx.post(root(server) + "/detokenize", json={"tokens": ids}, timeout=60)
    return r.json()["prompt"]


def test_logit_bias_bans_the_greedy_token_and_forces_another(server):
    first = greedy_ids(server, HELLO_IDS, 1)[0]
    c = client(server)
    kw: dict[str, Any] = dict(
        model=server.model,
        prompt=HELLO_IDS,
        max_tokens=1,
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    plain = c.completions.create(**kw).choices[0].text
    banned = c.completions.create(logit_bias={str(first): -100}, **kw).choices[0].text
    assert plain == detokenize(server, [first]) and banned != plain
    runner_up = greedy_ids(server, HELLO_IDS, 1, logit_bias={first: -100.0})[0]
    assert runner_up != first and banned == detokenize(server, [runner_up])
    forced = c.completions.create(**{**kw, "max_tokens": 3}, logit_bias={"1234": 100})
    assert forced.choices[0].text == detokenize(server, [1234] * 3)


def test_mixed_batch_with_and_without_logit_bias_matches_sequential(server):
    def complete(i: int) -> str:
        bias = {"1234": 100} if i % 2 else None
        r = client(server).completions.create(
            model=server.model,
            prompt=PROMPTS[i],
            max_tokens=6,
            logit_bias=bias,
            extra_body={"ignore_eos": True},
            **GREEDY,
        )
        return r.choices[0].text

    sequential = [complete(i) for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        concurrent = list(pool.map(complete, range(len(PROMPTS))))
    assert concurrent == sequential
    assert all(t == detokenize(server, [1234] * 6) for t in sequential[1::2])
    assert all(t != sequential[1] for t in sequential[0::2])


@pytest.mark.parametrize(
    "bias,words",
    [({"151936000": 1}, "not a token id"), ({"12": 200}, "[-100, 100]"), ({"x": 1}, "token ids")],
)
def test_bad_logit_bias_is_400(server, bias, words):
    with pytest.raises(openai.BadRequestError) as e:
        chat_once(server, "hi", max_tokens=1, logit_bias=bias)
    assert words in e.value.message


# ---------------------------------------------------------------- a list of prompts


def test_completion_with_a_list_of_prompts_matches_one_by_one(server):
    c = client(server)
    kw: dict[str, Any] = dict(
        model=server.model, max_tokens=6, extra_body={"ignore_eos": True}, **GREEDY
    )
    prompts = PROMPTS[:3]
    singles = [c.completions.create(prompt=p, **kw) for p in prompts]
    batch = c.completions.create(prompt=prompts, **kw)
    assert [ch.index for ch in batch.choices] == [0, 1, 2]
    assert [ch.text for ch in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batch.usage.completion_tokens == 18
    by_ids = c.completions.create(prompt=[HELLO_IDS, HELLO_IDS[:2]], **kw)
    assert by_ids.usage.prompt_tokens == 6 and len(by_ids.choices) == 2

    text: dict[int, str] = {}
    chunks = list(
        c.completions.create(
            prompt=prompts, stream=True, stream_options={"include_usage": True}, **kw
        )
    )
    for ch in chunks[:-1]:
        (choice,) = ch.choices
        text[choice.index] = text.get(choice.index, "") + choice.text
    assert [text[i] for i in range(3)] == [ch.text for ch in batch.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18


# ---------------------------------------------------------------- continue_final_message


def test_continue_final_message_goes_on_with_the_assistant_text(server):
    messages: list[Any] = [
        {"role": "user", "content": "Count to five."},
        {"role": "assistant", "content": "One, two,"},
    ]
    flags = {"add_generation_prompt": False, "continue_final_message": True}
    tok = httpx.post(root(server) + "/tokenize", json={"messages": messages, **flags}, timeout=60)
    assert tok.status_code == 200, tok.text
    prompt = detokenize(server, tok.json()["tokens"])
    assert prompt.endswith("<|im_start|>assistant\nOne, two,")  # left open, no <|im_end|>
    r = client(server).chat.completions.create(
        model=server.model,
        messages=messages,
        max_tokens=4,
        extra_body={"ignore_eos": True, **flags},
        **GREEDY,
    )
    assert r.usage is not None and r.usage.prompt_tokens == tok.json()["count"]
    same = client(server).completions.create(
        model=server.model,
        prompt=tok.json()["tokens"],
        max_tokens=4,
        extra_body={"ignore_eos": True},
        **GREEDY,
    )
    assert r.choices[0].message.content == same.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(
            model=server.model,
            messages=messages,
            max_tokens=1,
            extra_body={"continue_final_message": True},  # add_generation_prompt stays true
        )
    assert "add_generation_prompt" in e.value.message


def test_n_choices_share_the_prompt_and_stream_by_index(server):
    c = client(server)
    kw: dict[str, Any] = dict(
        model=server.model,
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=6,
        temperature=1.0,
        seed=11,
    )
    one = c.chat.completions.create(**kw)
    three = c.chat.completions.create(n=3, **kw)
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    assert three.choices[0].message.content == one.choices[0].message.content  # copy 0: seed
    texts = {ch.message.content for ch in three.choices}
    assert len(texts) > 1  # seeds 11, 12, 13 draw differently
    assert one.usage is not None and three.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counted once
    assert three.usage.completion_tokens == 3 * 6
    stream = c.chat.completions.create(
        n=3, stream=True, stream_options={"include_usage": True}, **kw
    )
    parts: dict[int, str] = {0: "", 1: "", 2: ""}
    usage = None
    for chunk in stream:
        for ch in chunk.choices:
            parts[ch.index] += ch.delta.content or ""
        usage = chunk.usage or usage
    assert [parts[i] for i in range(3)] == [ch.message.content for ch in three.choices]
    assert usage is not None and usage.prompt_tokens == one.usage.prompt_tokens
    greedy = c.completions.create(
        model=server.model, prompt=["a", "b"], n=2, max_tokens=4, **GREEDY
    )
    texts2 = [ch.text for ch in greedy.choices]
    assert [ch.index for ch in greedy.choices] == [0, 1, 2, 3]
    assert texts2[0] == texts2[1] and texts2[2] == texts2[3]  # greedy copies agree
