"""Tests for actors/admission.py: each request rule refuses with a 400 naming its field, and
accepts the values at its boundaries. (The stages that apply them: test_tokenizer.py and
test_image_preprocessor.py next to this file.)"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from actors import admission
from actors.admission import RequestInvalid
from protocols.messages import GenerateRequest, SamplingParams

VOCAB = 1000


def refused(param: str | None, call: Any, *args: Any) -> str:
    """Run a rule that must refuse; check the 400's param and return its message."""
    with pytest.raises(RequestInvalid) as e:
        call(*args)
    assert e.value.param == param
    info = e.value.error
    assert (info.code, info.type, info.param) == (400, "BadRequestError", param)
    return str(e.value)


# ---------------------------------------------------------------- sampling values


@pytest.mark.parametrize(
    "field,value,param",
    [
        ("temperature", -0.1, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("temperature", "hot", "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("min_p", 1.5, "min_p"),
        ("min_p", -0.1, "min_p"),
        ("presence_penalty", 2.5, "presence_penalty"),
        ("frequency_penalty", -3, "frequency_penalty"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("top_k", -2, "top_k"),
        ("top_k", 1.5, "top_k"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", "8", "max_tokens"),
        ("min_tokens", -1, "min_tokens"),
        ("logprobs", 21, "logprobs"),
        ("logprobs", -1, "logprobs"),
        ("seed", 1.5, "seed"),
        ("ignore_eos", "yes", "ignore_eos"),
        ("skip_special_tokens", 1, "skip_special_tokens"),
        ("stop", "END", "stop"),
        ("stop", ["a", 3], "stop"),
        ("stop_token_ids", [VOCAB], "stop_token_ids"),
        ("stop_token_ids", [-1], "stop_token_ids"),
        ("stop_token_ids", [True], "stop_token_ids"),
        ("logit_bias", {VOCAB: 1.0}, "logit_bias"),
        ("logit_bias", {-1: 1.0}, "logit_bias"),
        ("logit_bias", {"12": 1.0}, "logit_bias"),
        ("logit_bias", {12: 100.5}, "logit_bias"),
        ("logit_bias", {12: -101}, "logit_bias"),
        ("logit_bias", {12: "up"}, "logit_bias"),
        ("logit_bias", [12], "logit_bias"),
    ],
)
def test_sampling_values_out_of_range_are_refused(field: str, value: Any, param: str) -> None:
    sp = replace(SamplingParams(), **{field: value})
    message = refused(param, admission.check_sampling, sp, VOCAB)
    assert field in message


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0, "top_p": 1, "min_p": 0, "top_k": -1},
        {"temperature": 2.5, "min_p": 1.0, "top_k": 0, "repetition_penalty": 0.01},
        {"presence_penalty": -2, "frequency_penalty": 2.0, "logprobs": 0},
        {"logprobs": 20, "max_tokens": 1, "min_tokens": 1, "seed": -7},
        {"stop": ["a", ""], "stop_token_ids": [0, VOCAB - 1], "ignore_eos": True},
        {"logit_bias": {0: -100, VOCAB - 1: 100.0}},
        {"logit_bias": {}},
    ],
)
def test_sampling_values_at_their_bounds_pass(kw: dict[str, Any]) -> None:
    admission.check_sampling(SamplingParams(**kw), VOCAB)


def test_max_logprobs_is_the_servers_limit() -> None:
    admission.check_sampling(SamplingParams(logprobs=3), VOCAB, 3)
    message = refused("logprobs", admission.check_sampling, SamplingParams(logprobs=4), VOCAB, 3)
    assert "[0, 3]" in message and "--max-logprobs" in message
    admission.check_sampling(SamplingParams(logprobs=VOCAB), VOCAB, -1)  # -1: the vocabulary
    refused("logprobs", admission.check_sampling, SamplingParams(logprobs=VOCAB + 1), VOCAB, -1)


# ---------------------------------------------------------------- max_tokens and min_tokens


def sp(**kw: Any) -> SamplingParams:
    return SamplingParams(**kw)


def test_max_tokens_resolves_to_the_ask_or_what_the_context_leaves() -> None:
    assert admission.resolve_max_tokens(10, sp(max_tokens=5), 100) == 5
    assert admission.resolve_max_tokens(10, sp(max_tokens=90), 100) == 90
    assert admission.resolve_max_tokens(10, sp(), 100) == 90


@pytest.mark.parametrize("n_prompt,asked", [(100, None), (120, 4), (96, 5)])
def test_context_overflow_is_worded_like_vllm(n_prompt: int, asked: int | None) -> None:
    message = refused("messages", admission.resolve_max_tokens, n_prompt, sp(max_tokens=asked), 100)
    assert message.startswith("This model's maximum context length is 100 tokens.")
    assert f"you requested {n_prompt + (asked or 0)} tokens ({n_prompt} in the messages" in message


def test_min_tokens_must_fit_the_resolved_budget() -> None:
    message = refused(
        "min_tokens", admission.resolve_max_tokens, 10, sp(max_tokens=2, min_tokens=3), 100
    )
    assert "min_tokens (3)" in message and "max_tokens (2)" in message
    refused("min_tokens", admission.resolve_max_tokens, 90, sp(min_tokens=11), 100)
    assert admission.resolve_max_tokens(90, sp(min_tokens=10), 100) == 10


# ---------------------------------------------------------------- the prompt


@pytest.mark.parametrize("rid", [5, "", None])
def test_request_id_is_a_non_empty_string(rid: object) -> None:
    refused("request_id", admission.check_request_id, rid)
    admission.check_request_id("r-1")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"prompt": "a", "prompt_token_ids": [1]},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
    ],
)
def test_exactly_one_prompt_form(kw: dict[str, Any]) -> None:
    assert "exactly one" in refused(None, admission.check_prompt_form, GenerateRequest("r", **kw))


def test_prompt_form_types_and_the_param_that_names_the_prompt() -> None:
    refused("prompt", admission.check_prompt_form, GenerateRequest("r", prompt=5))  # type: ignore[arg-type]
    refused("prompt", admission.check_prompt_form, GenerateRequest("r", prompt_token_ids="1"))  # type: ignore[arg-type]
    chat = GenerateRequest("r", messages=[{"role": "user", "content": "x"}])
    assert admission.check_prompt_form(chat) == "messages"
    assert admission.check_prompt_form(GenerateRequest("r", prompt_token_ids=[1])) == "prompt"


@pytest.mark.parametrize("ids", [[], [1, VOCAB], [-1], [1, 2.0], [True]])
def test_prompt_ids_are_non_empty_and_inside_the_vocabulary(ids: list[Any]) -> None:
    message = refused("prompt", admission.check_prompt_ids, ids, VOCAB, "prompt")
    assert ("empty" in message) if not ids else ("outside the vocabulary" in message)


def test_prompt_ids_inside_the_vocabulary_pass() -> None:
    admission.check_prompt_ids([0, 5, VOCAB - 1], VOCAB, "prompt")


# ---------------------------------------------------------------- chat messages


def user(*parts: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


TEXT = {"type": "text", "text": "what is this?"}


def test_image_sources_in_prompt_order_in_every_accepted_form() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": None},
        *user(
            {"type": "image_url", "image_url": {"url": "data:a"}},
            TEXT,
            {"type": "image_url", "image_url": "data:b"},
            {"type": "image", "image": "data:c"},
        ),
    ]
    assert admission.parse_messages(messages, accepts_images=True) == ["data:a", "data:b", "data:c"]
    assert admission.parse_messages(user(TEXT), accepts_images=False) == []


@pytest.mark.parametrize(
    "messages,param",
    [
        ([], "messages"),
        ("hello", "messages"),
        (["not an object"], "messages.0"),
        ([{"content": "no role"}], "messages.0.role"),
        ([{"role": "user", "content": "a"}, {"role": 3, "content": "b"}], "messages.1.role"),
        ([{"role": "user", "content": 5}], "messages.0.content"),
        ([{"role": "wizard", "content": "abracadabra"}], "messages.0.role"),
        (user("not an object"), "messages.0.content.0"),
        (user(TEXT, {"text": "a part without type"}), "messages.0.content.1.type"),
        (user({"image_url": {"url": "data:a"}}), "messages.0.content.0.type"),
        (user({"type": "input_audio", "input_audio": {}}), "messages.0.content.0.type"),
        (user({"type": "text", "text": 5}), "messages.0.content.0.text"),
        (user({"type": "image_url", "image_url": {"url": ""}}), "messages.0.content.0.image_url"),
        (user({"type": "image", "image": None}), "messages.0.content.0.image"),
    ],
)
def test_malformed_messages_are_refused_naming_the_part(messages: Any, param: str) -> None:
    refused(param, admission.parse_messages, messages, True)


def test_every_openai_role_is_accepted_and_others_are_named() -> None:
    messages = [{"role": role, "content": "x"} for role in admission.CHAT_ROLES]
    assert admission.parse_messages(messages, accepts_images=False) == []
    message = refused(
        "messages.0.role", admission.parse_messages, [{"role": "wizard", "content": "x"}], False
    )
    assert "'wizard' is not one of system, developer, user, assistant, tool" in message


def test_images_beyond_the_servers_limit_are_refused() -> None:
    admission.check_image_count(2, {"image": 2})
    admission.check_image_count(64, {})  # no --limit-mm-per-prompt: 64
    refused("messages", admission.check_image_count, 65, {})
    admission.check_image_count(9, {"video": 0})
    message = refused("messages", admission.check_image_count, 3, {"image": 2})
    assert message.startswith("At most 2 image(s) may be provided in one prompt")


def test_a_part_without_type_is_refused_with_a_clear_message() -> None:
    message = refused(
        "messages.0.content.0.type", admission.parse_messages, user({"text": "hi"}), False
    )
    assert "needs a string 'type'" in message


def test_a_text_only_model_refuses_image_parts() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:a"}}
    message = refused("messages.0.content.1", admission.parse_messages, user(TEXT, image), False)
    assert "text only" in message


def test_template_kwargs_may_not_replace_the_engines_arguments() -> None:
    admission.check_template_kwargs({"enable_thinking": False})
    refused("chat_template_kwargs", admission.check_template_kwargs, ["x"])
    message = refused("chat_template_kwargs", admission.check_template_kwargs, {"messages": []})
    assert "'messages'" in message


def test_continue_final_message_excludes_the_generation_prompt() -> None:
    admission.check_generation_prompt(True, False)
    admission.check_generation_prompt(False, True)
    message = refused("continue_final_message", admission.check_generation_prompt, True, True)
    assert "add_generation_prompt" in message
    refused("continue_final_message", admission.check_generation_prompt, False, "yes")
    refused("chat_template_kwargs", admission.check_template_kwargs, {"continue_final_message": 1})


def test_image_placeholders_one_per_image() -> None:
    admission.check_image_placeholders([1, 9, 2, 9], 9, 2)
    assert "placed 1 image placeholders for 2 images" in refused(
        "messages", admission.check_image_placeholders, [1, 9, 2], 9, 2
    )


def test_mm_processor_kwargs_known_integers_only() -> None:
    assert admission.mm_processor_kwargs({"max_pixels": 1000}) == {"max_pixels": 1000}
    assert "['fps']" in refused("mm_processor_kwargs", admission.mm_processor_kwargs, {"fps": 2})
    refused("mm_processor_kwargs.min_pixels", admission.mm_processor_kwargs, {"min_pixels": "a"})
    refused("mm_processor_kwargs", admission.mm_processor_kwargs, "max_pixels=3")


# ---------------------------------------------------------------- tools


def test_tool_definitions_need_a_function_name() -> None:
    admission.check_tools(None)
    admission.check_tools([{"type": "function", "function": {"name": "f", "parameters": {}}}])
    for tools, param in [
        ({"name": "f"}, "tools"),
        ([{"type": "function", "function": {"name": ""}}], "tools.0"),
        ([{"type": "function", "function": {}}], "tools.0"),
        ([{"type": "retrieval"}], "tools.0"),
        (["f"], "tools.0"),
    ]:
        refused(param, admission.check_tools, tools)


def test_assistant_tool_calls_are_checked_inside_the_messages() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    good: list[dict[str, Any]] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    assert admission.parse_messages(good, accepts_images=False) == []
    where = "messages.1.tool_calls"
    bad_calls: list[tuple[Any, str]] = [
        ({"function": {}}, where),
        ([{"type": "function"}], f"{where}.0.function"),
        ([{"function": {"name": "f", "arguments": "{oops"}}], f"{where}.0.function.arguments"),
        ([{"function": {"name": "f", "arguments": 3}}], f"{where}.0.function.arguments"),
    ]
    for calls, param in bad_calls:
        bad = [good[0], {**good[1], "tool_calls": calls}]
        refused(param, admission.parse_messages, bad, False)


def test_request_chat_template_needs_the_servers_trust() -> None:
    message = refused("chat_template", admission.request_chat_template, "{{ 1 }}", {}, False)
    assert "--trust-request-chat-template" in message
    refused(
        "chat_template_kwargs",
        admission.request_chat_template,
        None,
        {"chat_template": "{{ 1 }}"},
        False,
    )
    assert admission.request_chat_template(None, {}, False) is None
    assert admission.request_chat_template(None, {"chat_template": None}, False) is None
    assert admission.request_chat_template("{{ 1 }}", {}, True) == "{{ 1 }}"
    assert admission.request_chat_template(None, {"chat_template": "T"}, True) == "T"
    refused("chat_template", admission.request_chat_template, "", {}, True)


def test_seed_is_a_64_bit_integer() -> None:
    for seed in (2**63, -(2**63) - 1):
        refused("seed", admission.check_sampling, SamplingParams(seed=seed), VOCAB)
    for seed in (2**63 - 1, -(2**63)):
        admission.check_sampling(SamplingParams(seed=seed), VOCAB)
