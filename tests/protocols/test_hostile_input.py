"""Hostile input at the HTTP hop, without processes: strict body types, values the wire cannot
carry, the API key on every route but the probes, /v1/models without the checkpoint path, and
error messages without internals (protocols/openai/schemas.py, app.py; protocols/messages.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from starlette.testclient import TestClient

from core.config import EngineConfig
from protocols.messages import ErrorInfo, public_text
from protocols.openai.app import build_app
from protocols.openai.convert import OpenAIError, _logit_bias
from protocols.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    WireValueError,
    check_wire_values,
)
from tests.protocols.test_openai_app import CHAT, FakeClient, make


@pytest.mark.parametrize(
    "fields",
    [
        {"stream": "yes"},
        {"stream": 1},
        {"ignore_eos": "false"},
        {"max_tokens": 1.5},
        {"max_tokens": "3"},
        {"temperature": "0.2"},
        {"stream_options": {"include_usage": "true"}},
        {"stop": 5},
        {"chat_template": 1},
    ],
)
def test_schemas_refuse_lax_coercions(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**CHAT, **fields})


def test_schemas_take_an_integer_for_a_number() -> None:
    body = ChatCompletionRequest.model_validate({**CHAT, "temperature": 0, "top_p": 1})
    assert body.temperature == 0.0 and isinstance(body.temperature, float)


@pytest.mark.parametrize(
    ("data", "param"),
    [
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"a": [1, {"b": 2**64}]}, "a.1.b"),
        ({"s": "x\ud800"}, "s"),
        ({"\udc00": 1}, "\\udc00"),
    ],
)
def test_wire_values_outside_64_bits_or_utf8_are_refused(data: Any, param: str) -> None:
    with pytest.raises(WireValueError) as caught:
        check_wire_values(data)
    assert caught.value.param == param


def test_wire_values_refuse_deep_nesting_and_take_the_extremes() -> None:
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    with pytest.raises(WireValueError, match="nested"):
        check_wire_values({"x": deep})
    check_wire_values({"a": [2**63 - 1, -(2**63), 1.5, None, True, "ok \U0001f600"]})


def test_completion_token_ids_above_64_bits_are_refused() -> None:
    with pytest.raises(ValidationError, match="64-bit"):
        CompletionRequest.model_validate({"prompt": [1, 2**64]})


@pytest.mark.parametrize("key", ["1_0", " 10", "+5", "1e3", "9" * 21, str(2**63), "x"])
def test_logit_bias_keys_are_plain_64_bit_integers(key: str) -> None:
    with pytest.raises(OpenAIError):
        _logit_bias({key: 1.0})
    assert _logit_bias({"12": 1.0, "-3": 2.0}) == {12: 1.0, -3: 2.0}


def test_http_refusals_are_400_in_openai_shape() -> None:
    _, http = make()
    for body in ({**CHAT, "stream": "yes"}, {**CHAT, "seed": 2**64}):
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    raw = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    r = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/metrics"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/version"),
        ("GET", "/v1/models"),
        ("POST", "/tokenize"),
        ("POST", "/detokenize"),
        ("GET", "/nowhere"),
    ],
)
def test_api_key_guards_every_route_but_the_probes(method: str, path: str) -> None:
    _, http = make(api_key="sekret")
    r = http.request(method, path)
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    ok = http.request(method, path, headers={"Authorization": "Bearer sekret"})
    assert ok.status_code != 401
    assert http.get("/health").status_code == 200 and http.get("/ping").status_code == 200


def test_api_key_guard_knows_the_probes_under_a_root_path() -> None:
    _, http = make(api_key="sekret", root_path="/api")
    assert http.get("/api/health").status_code == 200
    assert http.get("/api/metrics").status_code == 401


def test_models_never_show_the_checkpoint_path() -> None:
    _, http = make()  # EngineConfig(model="/ckpt/tiny")
    r = http.get("/v1/models")
    assert "/ckpt" not in r.text
    assert [(m["id"], m["root"]) for m in r.json()["data"]] == [
        ("tiny", "tiny"),
        ("alias", "alias"),
    ]


def test_unexpected_errors_name_their_kind_only() -> None:
    def boom(_: Any) -> Any:
        raise RuntimeError("secret <Thing object at 0x7ff00deadbeef> /home/me")

    fake = FakeClient(boom)
    app = build_app(fake, EngineConfig(served_model_name=["tiny"]))  # type: ignore[arg-type]
    r = TestClient(app, raise_server_exceptions=False).post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 500
    message = r.json()["error"]["message"]
    assert "RuntimeError" in message and "secret" not in message and "0x" not in message


def test_error_messages_lose_reprs_addresses_and_tracebacks() -> None:
    text = "cannot identify image file <_io.BytesIO object at 0x7ff3a1b2c3d0>"
    assert public_text(text) == "cannot identify image file <object>"
    assert "0x7ff3" not in public_text("bad pointer 0x7ff3a1b2c3d0")
    assert public_text('oops\nTraceback (most recent call last):\n  File "x.py"') == "oops"
    assert ErrorInfo("bad \ud800").message == "bad \\ud800"
