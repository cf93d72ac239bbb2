"""`python -m core.launch --help` (core/cli.py's parser): every flag has a description and says
its default, so the help is the reference of the command line."""

from __future__ import annotations

import argparse

from core.cli import _HelpFormatter, build_parser


def test_every_flag_has_help_text_that_names_its_default() -> None:
    parser = build_parser()
    formatter = _HelpFormatter("python -m core.launch")
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        text = formatter._get_help_string(action) or ""
        if not (action.help or "").strip() or "default" not in text:
            missing.append(name)
    assert missing == []


def test_help_lists_the_request_caps() -> None:
    text = build_parser().format_help()
    for flag in (
        "--max-num-queued-requests",
        "--max-request-body-bytes",
        "--max-request-headers",
        "--max-request-header-bytes",
        "--request-body-timeout",
        "--max-messages",
        "--max-prompt-chars",
        "--max-n",
        "--max-stop-strings",
        "--max-stop-string-chars",
    ):
        assert flag in text
