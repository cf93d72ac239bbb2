"""End to end: /tokenize and /detokenize give what generation runs, and a vLLM command line
(positional model, vLLM's flags and value syntax) starts Tessera and acts as documented.

HTTP client -> OpenAI adapter -> gateway -> tokenizer stage -> gateway -> client, on real
processes and sockets; fixtures from tests/e2e/conftest.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SERVER_ARGS, _Server
from tests.e2e.engine_process import EngineProcess

HELLO_IDS = [9707, 11, 1879, 0]  # "Hello, world!" in the Qwen2.5 tokenizer
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]
TLS = Path(__file__).resolve().parents[1] / "assets" / "tls"
TEMPLATE = "{% for m in messages %}<<{{ m.role }}>> {{ m.content }}\n{% endfor %}"
# sampling defaults that make a request with no sampling fields greedy (top_k 1)
GREEDY_BY_DEFAULT = {"temperature": 0.9, "top_k": 1, "do_sample": True, "eos_token_id": [0]}


def post(url: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(url, json=body, timeout=60, verify=False, **kw)


def root(server: _Server) -> str:
    return server.base_url.removesuffix("/v1")


def test_tokenize_round_trip_matches_generation(server: _Server) -> None:
    tok = post(root(server) + "/tokenize", {"model": server.model, "messages": MESSAGES})
    assert tok.status_code == 200, tok.text
    body = tok.json()
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 256
    assert body["token_strs"] is None

    text = post(root(server) + "/detokenize", {"model": server.model, "tokens": body["tokens"]})
    assert text.status_code == 200
    prompt = text.json()["prompt"]
    assert "Name three colours." in prompt and prompt.startswith("<|im_start|>system")
    again = post(root(server) + "/tokenize", {"prompt": prompt, "add_special_tokens": False})
    assert again.json()["tokens"] == body["tokens"]

    chat = post(
        server.base_url + "/chat/completions",
        {"model": server.model, "messages": MESSAGES, "max_tokens": 1, "temperature": 0},
    )
    assert chat.status_code == 200
    assert chat.json()["usage"]["prompt_tokens"] == body["count"]


def test_tokenize_a_prompt_like_vllm(server: _Server) -> None:
    r = post(root(server) + "/tokenize", {"prompt": "Hello, world!", "return_token_strs": True})
    assert r.json() == {
        "count": 4,
        "max_model_len": 256,
        "tokens": HELLO_IDS,
        "token_strs": ["Hello", ",", "Ġworld", "!"],
    }
    assert post(root(server) + "/detokenize", {"tokens": HELLO_IDS}).json() == {
        "prompt": "Hello, world!"
    }


def test_unknown_role_is_400_everywhere(server: _Server) -> None:
    wizard = [{"role": "wizard", "content": "abracadabra"}]
    calls: list[tuple[str, dict[str, Any]]] = [
        (root(server) + "/tokenize", {"messages": wizard}),
        (server.base_url + "/chat/completions", {"model": server.model, "messages": wizard}),
    ]
    for url, body in calls:
        r = post(url, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"


def test_ping_get_and_post(server: _Server) -> None:
    assert httpx.get(root(server) + "/ping").status_code == 200
    assert httpx.post(root(server) + "/ping").status_code == 200


# ---------------------------------------------------------------- a vLLM command line

NO_EFFECT = [
    ["--trust-remote-code"],
    ["--disable-log-requests"],
    ["--swap-space", "4"],
    ["--disable-frontend-multiprocessing"],
    ["--max-seq-len-to-capture", "8192"],
]


@pytest.fixture(scope="module")
def vllm_style(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(TEMPLATE)
    generation = tmp_path_factory.mktemp("generation")
    (generation / "generation_config.json").write_text(json.dumps(GREEDY_BY_DEFAULT))
    args = [
        str(tiny_qwen2),  # positional, as `vllm serve MODEL`; no --served-model-name
        "--max-model-len",
        "0.25k",
        "--kv-cache-memory",
        "16M",
        "--threads",
        "1",
        "--log-level",
        "info",
        "--chat-template",
        str(template),
        "--max-logprobs",
        "2",
        "--limit-mm-per-prompt",
        '{"image": 1}',
        "--root-path",
        "/api",
        "--allowed-origins",
        '["https://ui.example"]',
        "--ssl-keyfile",
        str(TLS / "key.pem"),
        "--ssl-certfile",
        str(TLS / "cert.pem"),
        "--enforce-eager",
        "--quantization",
        "none",
        "--disable-log-stats",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--generation-config",
        str(generation),
        *[part for flag in NO_EFFECT for part in flag],
    ]
    eng = EngineProcess("", args).start()
    try:
        yield eng
    finally:
        eng.stop()


def test_vllm_flags_are_accepted_and_the_inert_ones_logged(vllm_style: Any) -> None:
    log = Path(vllm_style.log_path).read_text().splitlines()
    lines = [line for line in log if "vLLM flag accepted; it has no effect here" in line]
    assert len(lines) == len(NO_EFFECT)  # one per inert flag; none for the functional ones
    for line, flag in zip(lines, NO_EFFECT):
        assert line.rstrip().rstrip("'").endswith(" ".join(flag))


def test_served_name_is_the_model_string_and_the_folder_an_alias(
    vllm_style: Any, tiny_qwen2: Path
) -> None:
    models = httpx.get(vllm_style.base_url + "/models", verify=False).json()["data"]
    assert [m["id"] for m in models] == [str(tiny_qwen2)]
    assert models[0]["max_model_len"] == 250  # "0.25k"
    for name in (str(tiny_qwen2), tiny_qwen2.name):
        r = post(vllm_style.base_url + "/completions", {"model": name, "prompt": "Hi"})
        assert r.status_code == 200 and r.json()["model"] == name


def test_chat_template_flag_is_what_tokenize_and_generation_use(vllm_style: Any) -> None:
    tok = post(vllm_style.root_url + "/tokenize", {"messages": MESSAGES}).json()
    text = post(vllm_style.root_url + "/detokenize", {"tokens": tok["tokens"]}).json()["prompt"]
    assert text == "<<system>> You are terse.\n<<user>> Name three colours.\n"
    chat = post(vllm_style.base_url + "/chat/completions", {"messages": MESSAGES, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == tok["count"]


def test_max_logprobs_root_path_cors_and_tls(vllm_style: Any) -> None:
    base = vllm_style.base_url
    assert base.startswith("https://")
    chat = {"messages": MESSAGES, "max_tokens": 1, "logprobs": True}
    assert post(base + "/chat/completions", {**chat, "top_logprobs": 2}).status_code == 200
    deep = post(base + "/chat/completions", {**chat, "top_logprobs": 3})
    assert deep.status_code == 400 and "[0, 2]" in deep.json()["error"]["message"]
    # behind a proxy that strips /api: routes answer as usual, and the app's URLs carry /api
    openapi = httpx.get(vllm_style.root_url + "/openapi.json", verify=False).json()
    assert openapi["servers"] == [{"url": "/api"}]
    cors = httpx.get(base + "/models", headers={"Origin": "https://ui.example"}, verify=False)
    assert cors.headers["access-control-allow-origin"] == "https://ui.example"


def unset_vs_greedy(base: str) -> tuple[str, str]:
    """The text of a completion that sets no sampling field, and of the greedy one."""
    body = {"prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True}
    texts = []
    for extra in ({}, {"temperature": 0}):
        r = post(base + "/completions", {**body, **extra})
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    return texts[0], texts[1]


def test_generation_config_folder_gives_the_defaults(vllm_style: Any) -> None:
    unset, greedy = unset_vs_greedy(vllm_style.base_url)
    assert unset == greedy  # top_k 1 from the file
    log = Path(vllm_style.log_path).read_text()
    assert "request sampling defaults from generation_config.json" in log and "top_k=1" in log


@pytest.fixture(scope="module")
def model_with_defaults(tiny_qwen2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_qwen2 whose own generation_config.json carries sampling defaults."""
    folder = tmp_path_factory.mktemp("defaults") / "tiny-qwen2-defaults"
    folder.mkdir()
    for item in tiny_qwen2.iterdir():
        if item.name != "generation_config.json":
            (folder / item.name).symlink_to(item)
    own = json.loads((tiny_qwen2 / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**own, **GREEDY_BY_DEFAULT}))
    return folder


@pytest.mark.parametrize("source", ["auto", "vllm"])
def test_generation_config_auto_reads_the_model_folder_and_vllm_ignores_it(
    model_with_defaults: Path, source: str
) -> None:
    args = [*SERVER_ARGS, "--log-level", "info", "--generation-config", source]
    eng = EngineProcess(str(model_with_defaults), args).start()
    try:
        unset, greedy = unset_vs_greedy(eng.base_url)
        log = Path(eng.log_path).read_text()
    finally:
        eng.stop()
    applied = "request sampling defaults from generation_config.json" in log
    assert applied == (source == "auto")
    if source == "auto":
        assert unset == greedy
