"""Fixtures that run a real engine (processes, sockets, HTTP) on a tiny random Qwen2 checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.engine_process import EngineProcess
from tests.fixtures.checkpoints import make_qwen2_checkpoint

SERVER_ARGS = [
    "--max-model-len",
    "256",
    "--kv-cache-memory",
    str(16 << 20),
    "--served-model-name",
    "tiny-qwen2",
    "--threads",
    "1",
]


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-qwen2")


def _serve(
    model: Path, api_key: str | None = None, extra: list[str] | None = None
) -> Iterator[EngineProcess]:
    eng = EngineProcess(str(model), SERVER_ARGS + (extra or []), api_key=api_key).start()
    eng.model_name = "tiny-qwen2"  # type: ignore[attr-defined]
    try:
        yield eng
    finally:
        eng.stop()


class _Server:
    def __init__(self, eng: EngineProcess) -> None:
        self.engine = eng
        self.base_url = eng.base_url
        self.model = "tiny-qwen2"
        self.api_key = eng.api_key


@pytest.fixture(scope="session")
def server(tiny_qwen2: Path) -> Iterator[_Server]:
    for eng in _serve(tiny_qwen2):
        yield _Server(eng)


@pytest.fixture(scope="session")
def server_with_key(tiny_qwen2: Path) -> Iterator[_Server]:
    for eng in _serve(tiny_qwen2, api_key="sekrit"):
        yield _Server(eng)
