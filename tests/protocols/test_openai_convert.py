"""Unit tests of the OpenAI adapter's conversion and validation, with no engine running.

Covers the first and last hop of the HTTP path: request bodies -> GenerateRequest, outputs -> JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.config import EngineConfig
from protocols.messages import PositionLogprobs, RequestOutput, TokenLogprob
from protocols.openai import bodies, convert
from protocols.openai.convert import OpenAIError
from protocols.openai.generation_config import sampling_defaults
from protocols.openai.schemas import ChatCompletionRequest, CompletionRequest
from protocols.openai.stream import ChatChunks, CompletionChunks

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=MESSAGES, **kw)


def test_chat_request_maps_every_sampling_field():
    req = chat(
        max_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=5,
        min_p=0.1,
        seed=3,
        stop="END",
        stop_token_ids=[9],
        ignore_eos=True,
        min_tokens=2,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.1,
        logprobs=True,
        top_logprobs=3,
        skip_special_tokens=False,
        include_stop_str_in_output=True,
        chat_template_kwargs={"enable_thinking": False},
        add_generation_prompt=False,
        mm_processor_kwargs={"max_pixels": 1000},
    )
    gen = convert.chat_request(req, "rid")
    s = gen.sampling
    assert gen.request_id == "rid" and gen.messages == MESSAGES and gen.prompt is None
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (
        7,
        0.5,
        0.9,
        5,
        0.1,
        3,
    )
    assert s.stop == ["END"] and s.stop_token_ids == [9] and s.ignore_eos and s.min_tokens == 2
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.1)
    assert s.logprobs == 3 and not s.skip_special_tokens and s.include_stop_str_in_output
    assert gen.chat_template_kwargs == {"enable_thinking": False}
    assert not gen.add_generation_prompt and gen.mm_processor_kwargs == {"max_pixels": 1000}


def test_chat_defaults_leave_sampling_defaults():
    s = convert.chat_request(chat(), "r").sampling
    assert s.max_tokens is None and s.temperature == 1.0 and s.top_p == 1.0 and s.top_k == 0
    assert s.logprobs is None and s.stop == [] and s.repetition_penalty == 1.0
    assert s.logit_bias is None


def test_generation_config_defaults_fill_only_unset_fields():
    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05}
    s = convert.chat_request(chat(temperature=0.0, min_p=0.0), "r", defaults).sampling
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.repetition_penalty) == (
        0.0,
        0.8,
        20,
        0.0,
        1.0,
    )


def test_sampling_defaults_read_from_generation_config_json(tmp_path: Path) -> None:
    model, other = tmp_path / "model", tmp_path / "other"
    for folder, values in ((model, {"temperature": 0.7, "top_k": 20}), (other, {"top_p": 0.5})):
        folder.mkdir()
        extra = {"do_sample": True, "eos_token_id": [1, 2], "min_p": None, "max_new_tokens": 9}
        (folder / "generation_config.json").write_text(json.dumps({**values, **extra}))
    assert sampling_defaults(EngineConfig(model=str(model))) == {"temperature": 0.7, "top_k": 20}
    assert sampling_defaults(EngineConfig(model=str(model), generation_config="vllm")) == {}
    chosen = EngineConfig(model=str(model), generation_config=str(other))
    assert sampling_defaults(chosen) == {"top_p": 0.5}
    assert sampling_defaults(EngineConfig(model=str(tmp_path / "m.gguf"))) == {}  # none there
    (model / "generation_config.json").write_text('{"temperature": "hot"}')
    with pytest.raises(ValueError, match="temperature"):
        sampling_defaults(EngineConfig(model=str(model)))


def test_logit_bias_keys_become_token_ids():
    s = convert.chat_request(chat(logit_bias={"12": -100, "3": 0.5}), "r").sampling
    assert s.logit_bias == {12: -100.0, 3: 0.5}
    with pytest.raises(OpenAIError) as e:
        convert.chat_request(chat(logit_bias={"x12": 1}), "r")
    assert e.value.info.param == "logit_bias" and "x12" in str(e.value)


def test_max_completion_tokens_wins_over_max_tokens():
    assert (
        convert.chat_request(chat(max_tokens=5, max_completion_tokens=9), "r").sampling.max_tokens
        == 9
    )


def test_chat_logprobs_without_top_logprobs_is_zero_alternatives():
    assert convert.chat_request(chat(logprobs=True), "r").sampling.logprobs == 0


def test_top_logprobs_needs_logprobs():
    with pytest.raises(OpenAIError) as e:
        convert.chat_request(chat(top_logprobs=2), "r")
    assert e.value.info.param == "top_logprobs" and e.value.info.code == 400


def test_image_parts_pass_through_untouched():
    parts = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "what is this?"},
    ]
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": parts}])
    messages = convert.chat_request(req, "r").messages
    assert messages is not None and messages[0]["content"] == parts


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", "hot"),
        ("top_k", 1.5),
        ("max_tokens", "many"),
        ("stop_token_ids", ["a"]),
        ("messages", "hi"),
        ("messages", ["not an object"]),
        ("logprobs", "sometimes"),
    ],
)
def test_schema_checks_types(field, value):
    body = {"model": "m", "messages": MESSAGES, field: value}
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**body)


@pytest.mark.parametrize(
    "field,value",
    [("temperature", -0.1), ("top_p", 1.5), ("max_tokens", 0), ("min_tokens", -1), ("top_k", -2)],
)
def test_values_are_mapped_unchecked_for_the_engine_to_judge(field, value):
    """Value rules live in actors/admission.py (tests/actors/test_admission.py), so the SDK and
    HTTP requests meet them alike; the adapter passes values through."""
    assert getattr(convert.chat_request(chat(**{field: value}), "r").sampling, field) == value


def test_max_completion_tokens_zero_is_not_dropped():
    assert convert.chat_request(chat(max_completion_tokens=0), "r").sampling.max_tokens == 0


@pytest.mark.parametrize("n", [0, -1])
def test_n_out_of_range_rejected(n):
    with pytest.raises(OpenAIError) as e:
        convert.chat_requests(chat(n=n), "r")
    assert e.value.info.param == "n"


def test_n_choices_are_requests_of_their_own_with_distinct_seeds():
    one = convert.chat_requests(chat(n=1, seed=7), "r")
    assert [g.request_id for g in one] == ["r"] and one[0].sampling.seed == 7
    three = convert.chat_requests(chat(n=3, seed=2**63 - 2), "r")
    assert [g.request_id for g in three] == ["r-0", "r-1", "r-2"]
    assert [g.sampling.seed for g in three] == [2**63 - 2, 2**63 - 1, -(2**63)]
    assert all(g.messages == three[0].messages for g in three)
    unseeded = convert.chat_requests(chat(n=2), "r")
    assert [g.sampling.seed for g in unseeded] == [None, None]


def test_completions_give_n_choices_per_prompt_in_order():
    req = CompletionRequest(model="m", prompt=["a", "b"], n=2)
    gens = convert.completion_requests(req, "r")
    assert [(g.request_id, g.prompt) for g in gens] == [
        ("r-0", "a"),
        ("r-1", "a"),
        ("r-2", "b"),
        ("r-3", "b"),
    ]


def test_usage_counts_a_shared_prompt_once():
    part = {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 4},
    }
    total = bodies.summed_usage([part, part, part, part], shared=2)
    assert total["prompt_tokens"] == 20 and total["completion_tokens"] == 12
    assert total["total_tokens"] == 32 and total["prompt_tokens_details"]["cached_tokens"] == 8


def test_empty_stop_strings_dropped():
    assert convert.chat_request(chat(stop=["a", ""]), "r").sampling.stop == ["a"]


def test_the_user_field_is_accepted():
    assert chat(response_format={"type": "text"}, user="u").model == "m"


def test_resolve_model():
    assert convert.resolve_model("b", ["a", "b"]) == "b"
    assert convert.resolve_model(None, ["a", "b"]) == "a"
    with pytest.raises(OpenAIError) as e:
        convert.resolve_model("x", ["a"])
    info = e.value.info
    assert (info.code, info.type, info.param) == (404, "NotFoundError", "model")
    assert info.message == "The model `x` does not exist."


@pytest.mark.parametrize(
    "prompt,text,ids",
    [
        ("hello", "hello", None),
        (["hello"], "hello", None),
        ([1, 2, 3], None, [1, 2, 3]),
        ([[4, 5]], None, [4, 5]),
    ],
)
def test_completion_prompt_forms(prompt, text, ids):
    (gen,) = convert.completion_requests(CompletionRequest(model="m", prompt=prompt), "r")
    assert gen.prompt == text and gen.prompt_token_ids == ids and gen.messages is None
    assert gen.request_id == "r"


@pytest.mark.parametrize(
    "prompt,texts,ids",
    [
        (["a", "b", "c"], ["a", "b", "c"], [None] * 3),
        ([[1], [2, 3]], [None, None], [[1], [2, 3]]),
    ],
)
def test_a_list_of_prompts_is_one_request_per_prompt(prompt, texts, ids):
    gens = convert.completion_requests(
        CompletionRequest(model="m", prompt=prompt, max_tokens=3), "r"
    )
    assert [g.request_id for g in gens] == [f"r-{i}" for i in range(len(texts))]
    assert [g.prompt for g in gens] == texts and [g.prompt_token_ids for g in gens] == ids
    assert all(g.sampling.max_tokens == 3 for g in gens)
    assert len({id(g.sampling) for g in gens}) == len(gens)  # each its own record


def test_completion_defaults_to_16_tokens_and_int_logprobs():
    (gen,) = convert.completion_requests(CompletionRequest(model="m", prompt="x", logprobs=2), "r")
    assert gen.sampling.max_tokens == 16 and gen.sampling.logprobs == 2


@pytest.mark.parametrize(
    "kw",
    [
        {"prompt": "x", "best_of": 2},
        {"prompt": "x", "n": 0},
        {"prompt": "x", "suffix": "y"},
    ],
)
def test_completion_rejections(kw):
    with pytest.raises(OpenAIError):
        convert.completion_requests(CompletionRequest(model="m", **kw), "r")


@pytest.mark.parametrize(
    ("kw", "want"),
    [
        ({"echo": True}, None),
        ({"echo": True, "logprobs": 1}, 1),
        ({"logprobs": 1}, None),
        ({"prompt_logprobs": 0}, 0),
        ({"echo": True, "logprobs": 3, "prompt_logprobs": 1}, 3),
    ],
)
def test_echo_with_logprobs_asks_the_engine_for_prompt_logprobs(kw, want):
    (gen,) = convert.completion_requests(CompletionRequest(model="m", prompt="x", **kw), "r")
    assert gen.sampling.prompt_logprobs == want


def test_echoed_completion_lists_the_prompt_first():
    def pos(token: str, tid: int, lp: float) -> PositionLogprobs:
        return PositionLogprobs(TokenLogprob(tid, lp, token, rank=2), [TokenLogprob(9, -0.1, "Z")])

    done = bodies.Collected(
        text=" c",
        token_ids=[3],
        logprobs=[pos(" c", 3, -0.5)],
        final=RequestOutput("r", finish_reason="length"),
        prompt_logprobs=[None, pos(" b", 2, -1.5)],
        prompt_token_strs=["a", " b"],
    )
    echo = bodies.Echo("a b", top_k=1, prompt_top_k=1)
    body = bodies.completion_response([done], "cmpl-r", 0, "m", 1, echoes=[echo])
    (choice,) = body["choices"]
    assert choice["text"] == "a b c"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["a", " b", " c"]
    assert lp["token_logprobs"] == [None, -1.5, -0.5]
    assert lp["top_logprobs"] == [None, {"Z": -0.1, " b": -1.5}, {"Z": -0.1, " c": -0.5}]
    assert lp["text_offset"] == [0, 1, 3]
    assert choice["prompt_logprobs"] == [
        None,
        {
            "2": {"logprob": -1.5, "rank": 2, "decoded_token": " b"},
            "9": {"logprob": -0.1, "rank": None, "decoded_token": "Z"},
        },
    ]


def test_chat_echo_is_refused_clearly():
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], echo=True)
    with pytest.raises(OpenAIError, match="echo is not supported on chat"):
        convert.chat_requests(body, "r")


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_completion_prompt_is_left_to_the_engine(prompt):
    (gen,) = convert.completion_requests(CompletionRequest(model="m", prompt=prompt), "r")
    assert (gen.prompt, gen.prompt_token_ids) in [("", None), (None, [])]


# ---------------------------------------------------------------- outputs


def pos(token: str, lp: float, *top: tuple[str, float]) -> PositionLogprobs:
    return PositionLogprobs(TokenLogprob(1, lp, token), [TokenLogprob(2, v, t) for t, v in top])


def test_chat_logprobs_shape_and_clamp():
    out = bodies.chat_logprobs([pos("hé", -0.5, ("hé", -0.5), ("x", -math.inf))], top_k=2)
    entry = out["content"][0]
    assert entry["token"] == "hé" and entry["logprob"] == -0.5
    assert entry["bytes"] == list("hé".encode())
    assert [t["token"] for t in entry["top_logprobs"]] == ["hé", "x"]
    assert entry["top_logprobs"][1]["logprob"] == bodies.LOGPROB_FLOOR
    assert (
        bodies.chat_logprobs([pos("a", -1.0, ("a", -1.0))], 0)["content"][0]["top_logprobs"] == []
    )


def test_completion_logprobs_shape_and_offsets():
    out = bodies.completion_logprobs(
        [pos("ab", -0.1, ("ab", -0.1), ("c", -2.0)), pos("c", -0.2, ("d", -1.0))], top_k=2, offset=5
    )
    assert out["tokens"] == ["ab", "c"] and out["token_logprobs"] == [-0.1, -0.2]
    assert out["top_logprobs"] == [{"ab": -0.1, "c": -2.0}, {"d": -1.0, "c": -0.2}]
    assert out["text_offset"] == [5, 7]


def outputs() -> list[RequestOutput]:
    return [
        RequestOutput("r", text="Hel", token_ids=[1], logprobs=[pos("Hel", -0.1)]),
        RequestOutput(
            "r",
            text="lo",
            token_ids=[2],
            logprobs=[pos("lo", -0.2)],
            finish_reason="length",
            prompt_tokens=4,
            completion_tokens=2,
            cached_tokens=1,
        ),
    ]


def test_chat_response_shape():
    c = bodies.Collected()
    for out in outputs():
        c.add(out)
    body = bodies.chat_response([c], "chatcmpl-x", 1, "m", top_k=0)
    assert body["object"] == "chat.completion" and body["model"] == "m"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello"}
    assert choice["finish_reason"] == "length"
    assert [e["token"] for e in choice["logprobs"]["content"]] == ["Hel", "lo"]
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 2,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 1},
    }


def test_completion_response_shape():
    c = bodies.Collected()
    for out in outputs():
        c.add(out)
    body = bodies.completion_response([c], "cmpl-x", 1, "m", top_k=None)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "Hello" and body["choices"][0]["logprobs"] is None
    assert body["usage"]["total_tokens"] == 6
    two = bodies.completion_response([c, c], "cmpl-x", 1, "m", top_k=None)
    assert [ch["index"] for ch in two["choices"]] == [0, 1]
    assert two["usage"] == {
        "prompt_tokens": 8,
        "completion_tokens": 4,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 2},
    }


def test_chat_chunks_with_usage():
    r = ChatChunks("id", 1, "m", include_usage=True, top_k=None)
    first = r.start()[0]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["usage"] is None
    outs = outputs()
    mid = r.render(outs[0])[0]
    assert mid["choices"][0]["delta"] == {"content": "Hel"} and mid["usage"] is None
    last = r.render(outs[1])[0]
    assert last["choices"][0]["finish_reason"] == "length"
    (tail,) = r.finish(outs[1])
    assert tail["choices"] == [] and tail["usage"]["completion_tokens"] == 2


def test_chat_chunks_skip_empty_increments_and_omit_usage():
    r = ChatChunks("id", 1, "m", include_usage=False, top_k=None)
    assert r.render(RequestOutput("r", token_ids=[3])) == []
    body = r.render(RequestOutput("r", text="x"))[0]
    assert "usage" not in body and r.finish(RequestOutput("r", finish_reason="stop")) == []


def test_completion_chunks_offsets_run_across_chunks():
    r = CompletionChunks("id", 1, "m", include_usage=False, top_k=0)
    a, b = (r.render(o)[0]["choices"][0] for o in outputs())
    assert a["text"] == "Hel" and a["logprobs"]["text_offset"] == [0]
    assert b["logprobs"]["text_offset"] == [3] and b["finish_reason"] == "length"


# ---------------------------------------------------------------- tools

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    "kw,enabled,parser",
    [
        ({}, False, None),  # no tools: nothing to parse
        ({"tools": TOOLS, "tool_choice": "none"}, False, None),  # shown, never parsed
        ({"tools": TOOLS}, True, "hermes"),  # tools alone mean "auto"
        ({"tools": TOOLS, "tool_choice": "auto"}, True, "hermes"),
        ({"tools": [], "tool_choice": "required"}, False, None),  # "required" of nothing
    ],
)
def test_tool_choice_picks_the_parser(kw: dict, enabled: bool, parser: str | None) -> None:
    assert convert.tool_parser_for(chat(**kw), enabled, "hermes" if enabled else None) == parser


@pytest.mark.parametrize(
    "kw,enabled,words",
    [
        ({"tools": TOOLS}, False, "requires --enable-auto-tool-choice"),
        ({"tools": TOOLS, "tool_choice": "auto"}, False, "requires --enable-auto-tool-choice"),
        ({"tool_choice": "auto"}, True, "`tools` must be set"),
        ({"tools": TOOLS, "tool_choice": {"type": "function"}}, True, "a named tool_choice"),
        ({"tools": TOOLS, "tool_choice": "always"}, True, "Invalid value for `tool_choice`"),
    ],
)
def test_tool_choices_tessera_cannot_honour_are_400(kw: dict, enabled: bool, words: str) -> None:
    with pytest.raises(OpenAIError) as e:
        convert.tool_parser_for(chat(**kw), enabled, "hermes" if enabled else None)
    assert words in str(e.value) and e.value.info.param == "tool_choice"
    assert e.value.info.code == 400


def test_required_and_named_tool_choices_hold_the_answer_to_calls() -> None:
    required = convert.chat_request(chat(tools=TOOLS, tool_choice="required"), "r")
    assert required.sampling.structured is not None
    schema = json.loads(required.sampling.structured.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert convert.tool_parser_for(chat(tools=TOOLS, tool_choice="required"), False, None) == (
        "forced"
    )
    named = convert.chat_request(chat(tools=TOOLS, tool_choice=NAMED), "r").sampling.structured
    assert named is not None and named.kind == "json"
    name = "get_weather"
    assert convert.tool_parser_for(chat(tools=TOOLS, tool_choice=NAMED), False, None) == (
        f"forced:{name}"
    )
    with pytest.raises(OpenAIError, match="cannot be combined"):
        convert.chat_request(
            chat(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}),
            "r",
        )


def test_forced_answers_become_tool_calls() -> None:
    done = bodies.Collected(
        text='[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]',
        final=RequestOutput("r", finish_reason="stop"),
    )
    body = bodies.chat_response([done], "id", 1, "m", None, "forced")
    message = body["choices"][0]["message"]
    assert message["content"] is None and body["choices"][0]["finish_reason"] == "tool_calls"
    calls = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message["tool_calls"]
    ]
    assert calls == [("a", {"x": 1}), ("b", {})]
    named = bodies.Collected(
        text='{"city": "Oslo"}', final=RequestOutput("r", finish_reason="stop")
    )
    msg = bodies.chat_response([named], "id", 1, "m", None, "forced:get_weather")["choices"][0]
    assert msg["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    cut = bodies.Collected(text='{"city": "Os', final=RequestOutput("r", finish_reason="length"))
    msg = bodies.chat_response([cut], "id", 1, "m", None, "forced:get_weather")["choices"][0]
    assert msg["message"]["content"] == '{"city": "Os' and "tool_calls" not in msg["message"]


def test_tools_reach_the_chat_template_as_given():
    assert convert.chat_request(chat(tools=TOOLS, tool_choice="none"), "r").tools == TOOLS
    assert convert.chat_request(chat(), "r").tools is None


def tool_call_outputs(text: str, finish_reason: str = "stop") -> list[RequestOutput]:
    pieces = [text[i : i + 5] for i in range(0, len(text), 5)]
    outs = [RequestOutput("r", text=p, token_ids=[1]) for p in pieces]
    outs[-1].finish_reason, outs[-1].prompt_tokens = finish_reason, 3
    return outs


CALL_TEXT = (
    'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
)


@pytest.mark.parametrize("parallel", [True, False])
def test_chat_response_with_tool_calls(parallel: bool):
    c = bodies.Collected()
    for out in tool_call_outputs(CALL_TEXT):
        c.add(out)
    choice = bodies.chat_response([c], "x", 1, "m", None, "hermes", parallel)["choices"][0]
    message = choice["message"]
    assert message["content"] == "Checking." and choice["finish_reason"] == "tool_calls"
    calls = message["tool_calls"]
    assert [json.loads(t["function"]["arguments"]) for t in calls] == [
        {"city": "Paris"},
        {"city": "Oslo"},
    ][: 2 if parallel else 1]
    assert all(t["id"].startswith("call_") and t["type"] == "function" for t in calls)
    plain = bodies.chat_response([c], "x", 1, "m", None)["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": CALL_TEXT}  # tool_choice none
    assert plain["finish_reason"] == "stop"


def test_chat_chunks_stream_tool_call_deltas():
    r = ChatChunks("x", 1, "m", False, None, tool_parser="hermes")
    chunks = r.start() + [b for out in tool_call_outputs(CALL_TEXT) for b in r.render(out)]
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("content", "") for d in deltas[1:]) == "Checking."
    calls = [t for d in deltas for t in d.get("tool_calls", [])]
    firsts = [t for t in calls if "id" in t]
    assert [(t["index"], t["function"]["name"]) for t in firsts] == [
        (0, "get_weather"),
        (1, "get_weather"),
    ]
    for i, city in enumerate(("Paris", "Oslo")):
        args = "".join(t["function"]["arguments"] for t in calls if t["index"] == i)
        assert json.loads(args) == {"city": city}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(ch["choices"][0]["delta"] or ch["choices"][0]["finish_reason"] for ch in chunks)
