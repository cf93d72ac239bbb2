"""Checks made before any stage starts, so a mistake costs a second, not a model load: the HTTP
port is free, the model path holds a checkpoint, --max-model-len fits the model's positions, and
the files other flags name exist. Called by core.launch.run."""

from __future__ import annotations

import errno
import json
import os
import socket

from core.config import EngineConfig


def check_port(config: EngineConfig) -> None:
    """SystemExit naming the address when the HTTP port cannot be bound."""
    if not config.http:
        return
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            s.bind((config.host, config.port))
        except OSError as exc:
            why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc})"
            raise SystemExit(
                f"--port {config.port} on {config.host} {why}: stop what holds it or pick "
                "another --port"
            ) from None


def check_model_files(config: EngineConfig) -> None:
    """SystemExit when --model is a folder without config.json or a file that is no .gguf."""
    path = config.model
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(
            f"--model {path!r} has no config.json: pass a Hugging Face checkpoint folder "
            "(config.json and *.safetensors) or a .gguf file"
        )
    if os.path.isfile(path) and not path.endswith(".gguf"):
        raise SystemExit(f"--model {path!r} is a file but not a .gguf; pass a checkpoint folder")


def model_positions(path: str) -> int | None:
    """max_position_embeddings of an HF checkpoint folder's config.json (text_config's when it
    is nested, 4096 when unset, as models/config.py reads it); None for a .gguf file or a
    config.json that cannot be read (the model loader reports those)."""
    try:
        with open(os.path.join(path, "config.json"), "rb") as f:
            cfg = json.load(f)
        text = cfg.get("text_config") or cfg
        return int(text.get("max_position_embeddings", 4096))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def check_max_model_len(config: EngineConfig) -> None:
    """SystemExit when --max-model-len is beyond the positions the model was trained for."""
    if config.max_model_len is None or not os.path.isdir(config.model):
        return
    positions = model_positions(config.model)
    if positions is not None and config.max_model_len > positions:
        raise SystemExit(
            f"--max-model-len {config.max_model_len} is more than the model's "
            f"max_position_embeddings ({positions}, in {config.model}/config.json): lower it "
            "or leave it out to use the model's"
        )


def check_named_files(config: EngineConfig) -> None:
    """SystemExit naming a flag whose file or folder does not exist (--tokenizer is checked
    where the model is resolved, core/launch/default_model.py)."""
    named = [
        ("--allowed-local-media-path", config.allowed_local_media_path, os.path.isdir),
        ("--ssl-keyfile", config.ssl_keyfile, os.path.isfile),
        ("--ssl-certfile", config.ssl_certfile, os.path.isfile),
    ]
    for flag, path, exists in named:
        if path and not exists(path):
            raise SystemExit(f"{flag} {path!r} does not exist")
