"""Recorded decode steps (actors/execution/decode_graphs.py): a runner that replays them answers
exactly as one that runs every step eagerly, for text and M-RoPE models, at batch sizes that fill
a bucket and ones that pad it, with requests joining and leaving between steps.

Runs on CPU through a platform whose "recording" is the function itself (every replay runs the
forward again from the same fixed buffers, so the buffer filling and padding are what is
tested), and on an NVIDIA GPU with real CUDA graphs (skipped where there is none)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from actors.execution.decode_graphs import batch_buckets
from devices.base import Platform
from devices.cpu import CpuPlatform
from devices.cuda import CudaPlatform
from models import load_model
from models.decoder import Decoder
from tests.fixtures.checkpoints import make_qwen2_checkpoint
from tests.fixtures.vl_checkpoint import (
    IMAGE_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    make_qwen2_5_vl_checkpoint,
)
from tests.models.paged_runner import greedy_request, paged_runner, run_plans
from tests.models.vl_runner import VLPrompt, vl_request

torch.set_num_threads(2)

PROMPTS = [[9707, 11, 1879, 0, 3555], [785, 3974], [40, 1075, 311, 8180, 13, 2585, 1525, 374, 432]]


class ReplayingCpu(CpuPlatform):
    """CPU with graph "recording" that replays by calling the function again."""

    records_graphs = True

    def capture_graph(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return fn


def platforms() -> list[object]:
    cuda = pytest.mark.skipif(
        not CudaPlatform().is_available(), reason="needs an NVIDIA GPU; none is available here"
    )
    return ["cpu-replay", pytest.param("cuda", marks=cuda)]


def platform_for(name: str) -> tuple[Platform, torch.device]:
    if name == "cuda":
        return CudaPlatform(), torch.device("cuda")
    return ReplayingCpu(), torch.device("cpu")


def test_buckets_cover_every_batch_up_to_the_largest() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(64)[-3:] == [48, 56, 64]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_checkpoint(tmp_path_factory.mktemp("qwen2"), num_hidden_layers=2)


@pytest.fixture(scope="module")
def vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("vl"))


def generate(model: Decoder, platform: Platform | None, count: int, new: int) -> list[list[int]]:
    requests = [greedy_request(f"r{i}", PROMPTS[i % 3], new + i) for i in range(count)]
    runner = paged_runner(model, 64, enforce_eager=platform is None, platform=platform)
    jobs = run_plans(runner, requests, new)
    if platform is not None:
        assert runner.graphs is not None and runner.graphs.replays >= new - 1
    return [j.output for j in jobs]


@pytest.mark.parametrize("name", platforms())
@pytest.mark.parametrize("count", [1, 3, 6])  # bucket sizes 1, 4 (padded) and 6 (of max 8: 8)
def test_replayed_decode_matches_eager_text(qwen2: Path, name: str, count: int) -> None:
    platform, device = platform_for(name)
    model = load_model(str(qwen2), device, torch.float32)
    eager = generate(model, None, count, 6)
    assert generate(model, platform, count, 6) == eager


@pytest.mark.parametrize("name", platforms())
def test_replayed_decode_matches_eager_with_images(vl: Path, name: str) -> None:
    platform, device = platform_for(name)
    model = load_model(str(vl), device, torch.float32)
    image = (torch.randn(16, 1176, generator=torch.Generator().manual_seed(0)), (1, 4, 4))
    prompts = [
        VLPrompt([7, VISION_START_ID, *[IMAGE_TOKEN_ID] * 4, VISION_END_ID, 8], [image]),
        VLPrompt([5, 6]),
    ]
    outputs = []
    for graphs in (None, platform):
        pixels, requests = {}, []
        for i, prompt in enumerate(prompts):
            request, pixels[f"r{i}"] = vl_request(f"r{i}", prompt, 6, IMAGE_TOKEN_ID)
            requests.append(request)
        runner = paged_runner(model, 32, enforce_eager=graphs is None, platform=graphs)
        jobs = run_plans(runner, requests, 6, pixels=pixels)
        outputs.append([j.output for j in jobs])
        if graphs is not None:
            assert runner.graphs is not None and runner.graphs.replays >= 5
    assert outputs[0] == outputs[1]
