"""Structured logs for every actor: one line per event, carrying actor name and request id.

Each process calls `setup_logging` once; handlers bind `request_id` so a request can be followed
through tokenizer, scheduler, executor and detokenizer logs with one grep.
"""

from __future__ import annotations

import logging
import sys

import structlog


def setup_logging(actor: str, level: str = "info") -> structlog.stdlib.BoundLogger:
    lvl = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S.%f", utc=False),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    return structlog.get_logger().bind(actor=actor)
