"""The command line: vLLM's serving flags start Tessera (the functional ones act, the others are
recorded for a start-up log line), vLLM's integer syntax, and the served-name defaults."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from core.cli import NO_EFFECT_FLAGS, TOOL_CALL_PARSERS, build_parser, parse_args
from core.cli_values import human_readable_int
from core.config import EngineConfig
from core.launch.default_model import DEFAULT_MODEL_NAME, resolve_model
from protocols.openai.tool_parsers import PARSERS


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """parse_args must exit with a usage error; returns argparse's message."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("32k", 32_000),
        ("32K", 32_768),
        ("25.6k", 25_600),
        ("1m", 1_000_000),
        ("2M", 2 * 2**20),
        ("1g", 10**9),
        ("1G", 2**30),
        (" 8k ", 8_000),
    ],
)
def test_human_readable_int_reads_vllm_suffixes(text: str, value: int) -> None:
    assert human_readable_int(text) == value


@pytest.mark.parametrize("text", ["1.5K", "k", "32kb", "twelve", ""])
def test_human_readable_int_refuses_what_vllm_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        human_readable_int(text)


def test_max_model_len_takes_suffixes() -> None:
    assert parse_args(["--max-model-len", "32k"]).max_model_len == 32_000
    assert parse_args(["--max-model-len", "32K"]).max_model_len == 32_768
    assert parse_args(["--max-num-batched-tokens", "4k"]).max_num_batched_tokens == 4_000
    assert parse_args(["--kv-cache-memory", "1G"]).kv_cache_memory == 2**30


def test_abbreviations_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # allow_abbrev=False: a prefix of a flag is never taken for the flag
    assert "--tokenizer-w" in refused(["--tokenizer-w", "2"], capsys)
    assert "--max-model" in refused(["--max-model", "128"], capsys)


def test_tokenizer_is_its_own_flag() -> None:
    cfg = parse_args(["--tokenizer", "/tok", "--tokenizer-workers", "2"])
    assert cfg.tokenizer == "/tok" and cfg.tokenizer_workers == 2


def test_positional_model_is_the_model() -> None:
    assert parse_args(["/ckpt/a"]).model == "/ckpt/a"
    assert parse_args(["/ckpt/a", "--model", "/ckpt/a"]).model == "/ckpt/a"
    assert parse_args(["--port", "9000", "/ckpt/a"]).model == "/ckpt/a"


def test_two_different_models_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert "two models" in refused(["/ckpt/a", "--model", "/ckpt/b"], capsys)


def test_no_effect_flags_are_accepted_and_recorded() -> None:
    argv = [
        "--trust-remote-code",
        "--disable-log-requests",
        "--swap-space",
        "4",
        "--disable-frontend-multiprocessing",
        "--max-seq-len-to-capture",
        "8192",
    ]
    cfg = parse_args(argv)
    assert cfg.no_effect_flags == [
        "--trust-remote-code",
        "--disable-log-requests",
        "--swap-space 4",
        "--disable-frontend-multiprocessing",
        "--max-seq-len-to-capture 8192",
    ]
    assert parse_args([]).no_effect_flags == []
    # the record survives the trip to every actor
    assert EngineConfig.from_json(cfg.to_json()).no_effect_flags == cfg.no_effect_flags


def test_functional_vllm_flags_set_the_config(tmp_path: Path) -> None:
    cfg = parse_args(
        [
            "--enforce-eager",
            "--max-logprobs",
            "5",
            "--limit-mm-per-prompt",
            '{"image": 2}',
            "--allowed-origins",
            '["https://a.example"]',
            "--root-path",
            "/api",
            "--uvicorn-log-level",
            "info",
            "--disable-log-stats",
            "--quantization",
            "none",
        ]
    )
    assert cfg.enforce_eager is True and cfg.max_logprobs == 5
    assert cfg.limit_mm_per_prompt == {"image": 2}
    assert cfg.allowed_origins == ["https://a.example"] and cfg.root_path == "/api"
    assert cfg.uvicorn_log_level == "info" and cfg.log_stats_interval_s == 0
    assert cfg.no_effect_flags == []
    assert parse_args(["--limit-mm-per-prompt", "image=3,video=0"]).limit_mm_per_prompt == {
        "image": 3,
        "video": 0,
    }


def test_tool_call_flags_set_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"])
    assert cfg.enable_auto_tool_choice is True and cfg.tool_call_parser == "llama3_json"
    assert cfg.no_effect_flags == []
    again = EngineConfig.from_json(cfg.to_json())
    assert (again.enable_auto_tool_choice, again.tool_call_parser) == (True, "llama3_json")
    plain = parse_args(["--tool-call-parser", "hermes"])  # a parser alone: "auto" stays off
    assert plain.enable_auto_tool_choice is False and plain.tool_call_parser == "hermes"
    assert parse_args([]).tool_call_parser is None
    assert "requires --tool-call-parser" in refused(["--enable-auto-tool-choice"], capsys)
    assert "invalid choice" in refused(["--tool-call-parser", "mistral"], capsys)


def test_tool_call_parser_choices_are_the_parsers() -> None:
    assert sorted(TOOL_CALL_PARSERS) == sorted(PARSERS)


def test_generation_config_is_auto_vllm_or_a_folder_with_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_args([]).generation_config == "auto"
    assert parse_args(["--generation-config", "vllm"]).generation_config == "vllm"
    (tmp_path / "generation_config.json").write_text('{"temperature": 0.5}')
    cfg = parse_args(["--generation-config", str(tmp_path)])
    assert cfg.generation_config == str(tmp_path) and cfg.no_effect_flags == []
    assert EngineConfig.from_json(cfg.to_json()).generation_config == str(tmp_path)
    message = refused(["--generation-config", str(tmp_path / "nowhere")], capsys)
    assert "generation_config.json" in message


def test_quantization_names_a_method_or_a_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args([]).quantization == "none"
    assert parse_args(["--quantization", "INT4"]).quantization == "int4"
    cfg = parse_args(["-q", "awq"])
    assert EngineConfig.from_json(cfg.to_json()).quantization == "awq"
    assert "invalid choice" in refused(["-q", "bitsandbytes"], capsys)
    assert "tensor-parallel" in refused(["-q", "int8", "--tensor-parallel-size", "2"], capsys)


@pytest.mark.parametrize(
    "argv",
    [
        ["--limit-mm-per-prompt", '{"image": -1}'],
        ["--limit-mm-per-prompt", "images"],
        ["--allowed-origins", "https://a.example"],
        ["--ssl-keyfile", "key.pem"],
        ["--max-logprobs", "-2"],
        ["--chat-template", "no/such/template.jinja"],
    ],
)
def test_bad_values_are_refused_at_start(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    refused(argv, capsys)


def test_chat_template_from_a_file_or_inline(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert parse_args(["--chat-template", str(path)]).chat_template == path.read_text()
    inline = parse_args(["--chat-template", "{{ messages[0].content }}\\n"]).chat_template
    assert inline == "{{ messages[0].content }}\n"  # escapes decoded, as vLLM does


def test_every_flag_has_help_with_its_default() -> None:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings or action.dest} has no help"
    text = parser.format_help()
    for flags, _, _ in NO_EFFECT_FLAGS:
        assert flags[0] in text
    formatter = parser._get_formatter()
    assert all("default" in (formatter._get_help_string(a) or "") for a in parser._actions[1:])


def test_served_name_defaults_to_the_model_string_with_the_folder_as_alias(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ckpts" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = parse_args(["ckpts/tiny/"])
    resolve_model(cfg)
    assert cfg.model == str(tmp_path / "ckpts" / "tiny")
    assert cfg.model_names == ["ckpts/tiny/"]  # as given, as vLLM serves it
    assert cfg.accepted_model_names == ["ckpts/tiny/", "tiny"]


def test_served_model_name_replaces_the_defaults(tmp_path: Path) -> None:
    cfg = parse_args([str(tmp_path), "--served-model-name", "a", "b"])
    resolve_model(cfg)
    assert cfg.model_names == ["a", "b"] and cfg.accepted_model_names == ["a", "b"]


def test_default_model_keeps_its_name() -> None:
    cfg = parse_args([])  # the embedded SmolLM2 (installed with the test dependencies)
    resolve_model(cfg)
    assert cfg.model_names == [DEFAULT_MODEL_NAME] and cfg.model_aliases == []


def test_a_missing_tokenizer_is_refused(tmp_path: Path) -> None:
    cfg = parse_args([str(tmp_path), "--tokenizer", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="--tokenizer"):
        resolve_model(cfg)


def test_trust_request_chat_template_is_off_unless_asked(tmp_path: Path) -> None:
    assert parse_args([str(tmp_path)]).trust_request_chat_template is False
    assert parse_args([str(tmp_path), "--trust-request-chat-template"]).trust_request_chat_template
