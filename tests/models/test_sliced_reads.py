"""A tensor-parallel rank reads only its share of each checkpoint tensor: safetensors slices
(models/loader.py) and GGUF rows cut before dequantizing (models/gguf_loader.py) give exactly the
tensors that reading whole and slicing gives, and no rank reads a whole matrix."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from gguf import GGUFReader

from models import load_model
from models.config import ModelConfig
from models.gguf_loader import gguf_config, gguf_tensors
from models.loader import load_hf_config, safetensors_files, safetensors_tensors
from models.parallel import CheckpointTensor, Span, TensorInMemory, TensorParallel, shard_weights
from tests.fixtures.checkpoints import make_llama_checkpoint
from tests.models.test_gguf_smollm2 import GGUF


@dataclass
class RecordedReads:
    """A CheckpointTensor that notes what each read asked for (rows, columns)."""

    source: CheckpointTensor
    reads: list[tuple[Span | None, Span | None]] = field(default_factory=list)

    def read(self, rows: Span | None = None, columns: Span | None = None) -> torch.Tensor:
        self.reads.append((rows, columns))
        return self.source.read(rows, columns)


def recorded(
    weights: Iterable[tuple[str, CheckpointTensor]], into: dict[str, RecordedReads]
) -> Iterator[tuple[str, CheckpointTensor]]:
    for name, source in weights:
        into[name] = RecordedReads(source)
        yield name, into[name]


def whole(weights: Iterable[tuple[str, CheckpointTensor]]) -> list[tuple[str, CheckpointTensor]]:
    return [(name, TensorInMemory(source.read())) for name, source in weights]


def assert_sliced_reads_equal_whole_reads(
    sliced: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    reads: dict[str, RecordedReads],
) -> None:
    assert sliced.keys() == reference.keys()
    for name, tensor in sliced.items():
        assert torch.equal(tensor, reference[name]), name
        if tensor.dim() == 2:  # every matrix is split: none was read whole
            ((rows, columns),) = reads[name].reads
            assert (rows is None) != (columns is None), name


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """101 tokens and an MLP of 100: both split unevenly over 3 ranks; sharded files."""
    return make_llama_checkpoint(
        tmp_path_factory.mktemp("llama") / "ckpt",
        vocab_size=101,
        intermediate_size=100,
        mlp_bias=True,
        max_shard_size="100KB",
    )


@pytest.mark.parametrize("size", [2, 3])
def test_safetensors_slices_equal_whole_reads(llama: Path, size: int) -> None:
    config = load_hf_config(llama)
    files = safetensors_files(llama)
    assert len(files) > 1
    for r in range(size):
        tp = TensorParallel(r, size)
        reads: dict[str, RecordedReads] = {}
        sliced = dict(shard_weights(recorded(safetensors_tensors(files), reads), config, tp))
        reference = dict(shard_weights(whole(safetensors_tensors(files)), config, tp))
        assert_sliced_reads_equal_whole_reads(sliced, reference, reads)


def smollm2_layer0(
    reader: GGUFReader, config: ModelConfig
) -> Iterator[tuple[str, CheckpointTensor]]:
    """Layer 0's tensors, the embedding and the final norm: enough for every kind of split."""
    for name, source in gguf_tensors(reader, config):
        if "layers." not in name or ".layers.0." in name:
            yield name, source


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_gguf_rows_cut_before_dequantizing_equal_whole_reads(rank: int) -> None:
    # SmolLM2: llama Q / K rows permuted per head, 9 query heads and 3 KV heads over 3 ranks
    reader = GGUFReader(GGUF)
    config = gguf_config(reader)
    tp = TensorParallel(rank, 3)
    reads: dict[str, RecordedReads] = {}
    sliced = dict(shard_weights(recorded(smollm2_layer0(reader, config), reads), config, tp))
    reference = dict(shard_weights(whole(smollm2_layer0(reader, config)), config, tp))
    assert_sliced_reads_equal_whole_reads(sliced, reference, reads)
    assert sliced["model.embed_tokens.weight"].shape[0] == 49152 // 3


def test_quantization_with_tensor_parallelism_is_refused(llama: Path) -> None:
    with pytest.raises(ValueError, match="not supported yet"):
        load_model(str(llama), torch.device("cpu"), torch.float32, TensorParallel(0, 2), "int8")
