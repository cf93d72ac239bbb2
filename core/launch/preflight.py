"""Checks made before any stage starts, so a mistake costs a second, not a model load: the HTTP
port is free and the model path holds a checkpoint. Called by core.launch.run."""

from __future__ import annotations

import errno
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
