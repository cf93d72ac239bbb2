"""Executor stage: one per device (tensor-parallel rank). Holds the model and the KV cache,
runs each step plan's forward pass and samples the next tokens, vectorised over the batch.

The forward runs in a worker thread so the actor's loop keeps heartbeating and receiving.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from core.actor import Actor
from core.codec import Buffer
from devices import get_platform
from models.attention import AttentionMetadata, allocate_kv_cache, kv_cache_bytes_per_block
from models.loader import load_model
from models.sampler import SamplingBatch, sample
from protocols.messages import (
    ImageInput,
    NewSequence,
    PositionLogprobs,
    SampledToken,
    ScheduledSequence,
    StepPlan,
    StepResult,
    TokenLogprob,
)

ENCODER_CACHE_BYTES = 512 << 20
CPU_DEFAULT_KV_CAP = 2 << 30  # never claim all RAM by default on CPU (cf. vLLM CPU: 4 GiB)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class SequenceState:
    new: NewSequence
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    mrope_positions: torch.Tensor | None = None  # [3, prompt_len]

    @property
    def prompt_len(self) -> int:
        return len(self.new.prompt_token_ids)


class EncoderCache:
    """Vision-encoder outputs by image content hash, LRU, capped in bytes: an image is encoded
    once even when its placeholder tokens are split across prefill chunks or requests."""

    def __init__(self, max_bytes: int = ENCODER_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.encoded = 0

    def get(self, key: str, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = encode()
        self.encoded += 1
        self.entries[key] = value
        self.bytes += value.numel() * value.element_size()
        while self.bytes > self.max_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        return value


def buffer_tensor(buf: Buffer) -> torch.Tensor:
    """A wire Buffer as a torch tensor (copied: frames are read-only)."""
    arr = np.frombuffer(buf.data, dtype=np.dtype(buf.dtype)).reshape(buf.shape)
    return torch.from_numpy(arr.copy())


class ExecutorActor(Actor):
    async def setup(self) -> dict[str, Any]:
        c = self.config
        self.platform = get_platform(c.device)
        self.device = self.platform.torch_device(self.index)
        self.dtype = DTYPES[c.dtype] if c.dtype in DTYPES else self.platform.default_dtype()
        self.platform.set_threads(c.threads or len(os.sched_getaffinity(0)))
        torch.manual_seed(c.seed)
        t0 = time.monotonic()
        # Loaded on the loop (main) thread too: weights packed from a worker thread made decode
        # ~15% slower here (100 vs 86 ms per step); heartbeats come from their own thread.
        self.model = load_model(c.model, self.device, self.dtype)
        mc = self.model.config
        self.max_model_len, self.num_blocks = self._size_kv_pool()
        self.kv = allocate_kv_cache(mc, self.num_blocks, c.block_size, self.device, self.dtype)
        self.log.info(
            "model loaded",
            model=c.model,
            device=str(self.device),
            dtype=str(self.dtype),
            seconds=round(time.monotonic() - t0, 2),
            kv_blocks=self.num_blocks,
            block_size=c.block_size,
            max_model_len=self.max_model_len,
            max_concurrency=round(self.num_blocks * c.block_size / self.max_model_len, 2),
        )
        self.seqs: dict[str, SequenceState] = {}
        self.uses_mrope = mc.mrope_section is not None
        self.encoder_cache = EncoderCache()
        self.plans = self.transport.mailbox(self.addresses.plans[self.index], bind=False)
        self.results = self.transport.outbox(self.addresses.results) if self.index == 0 else None
        return {
            "num_blocks": self.num_blocks,
            "block_size": c.block_size,
            "max_model_len": self.max_model_len,
            "vocab_size": mc.vocab_size,
            "eos_token_ids": list(mc.eos_token_ids),
            "architecture": mc.architecture,
            "image_token_id": mc.image_token_id if mc.mrope_section else None,
            "spatial_merge_size": mc.spatial_merge_size,
        }

    def _size_kv_pool(self) -> tuple[int, int]:
        c, mc = self.config, self.model.config
        per_block = kv_cache_bytes_per_block(mc, c.block_size, self.dtype)
        if c.kv_cache_memory:
            budget = c.kv_cache_memory
        else:
            budget = int(self.platform.memory_free_bytes(self.device) * c.memory_utilization)
            if self.device.type == "cpu":
                budget = min(budget, CPU_DEFAULT_KV_CAP)
        num_blocks = budget // per_block
        fits = num_blocks * c.block_size
        if c.max_model_len is not None:
            if c.max_model_len > mc.max_position_embeddings:
                raise ValueError(
                    f"--max-model-len {c.max_model_len} exceeds the model's "
                    f"max_position_embeddings {mc.max_position_embeddings}"
                )
            if c.max_model_len > fits:
                raise ValueError(
                    f"--max-model-len {c.max_model_len} does not fit in the KV cache: "
                    f"{budget} bytes hold {num_blocks} blocks of {c.block_size} tokens "
                    f"({fits} tokens). Lower --max-model-len or raise --kv-cache-memory / "
                    "--memory-utilization."
                )
            return c.max_model_len, num_blocks
        if fits < 1:
            raise ValueError(f"no KV block fits in {budget} bytes; raise --kv-cache-memory")
        max_len = min(mc.max_position_embeddings, fits)
        if max_len < mc.max_position_embeddings:
            self.log.warning("max_model_len capped to the KV cache size", max_model_len=max_len)
        return max_len, num_blocks

    async def run(self) -> None:
        while True:
            plan: StepPlan = await self.plans.recv()
            for rid in plan.finished_ids:
                self.seqs.pop(rid, None)
            for new in plan.new_sequences:
                gen = None
                if new.sampling.seed is not None:
                    gen = torch.Generator(device=self.device).manual_seed(new.sampling.seed)
                st = SequenceState(new, list(new.output_token_ids), gen)
                if new.mrope_positions is not None:
                    st.mrope_positions = buffer_tensor(new.mrope_positions)
                self.seqs[new.request_id] = st
                self.log.debug(
                    "sequence added",
                    request_id=new.request_id,
                    images=len(new.images),
                    resumed=len(new.output_token_ids),
                )
            if not plan.sequences:
                continue
            t0 = time.perf_counter()
            # On the loop (main) thread on purpose: torch's OpenMP kernels run ~35% slower when
            # called from a worker thread (86 vs 117 ms per decode step measured here). Nothing
            # else waits on this loop while a step runs; heartbeats come from their own thread.
            error = None
            try:
                sampled = self.execute(plan)
            except Exception as exc:  # one failed step fails its requests, not the engine
                self.log.exception("step failed", step_id=plan.step_id)
                sampled, error = [], f"{type(exc).__name__}: {exc}"
                for s in plan.sequences:
                    self.seqs.pop(s.request_id, None)
            if self.results is not None:
                elapsed = time.perf_counter() - t0
                await self.results.send(StepResult(plan.step_id, sampled, elapsed, error))

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> list[SampledToken]:
        seqs = plan.sequences
        ids: list[int] = []
        for s in seqs:
            ids.extend(s.token_ids)
        dev = self.device
        meta = AttentionMetadata.build(
            [len(s.token_ids) for s in seqs],
            [s.start_pos for s in seqs],
            [s.block_table for s in seqs],
            self.config.block_size,
            dev,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        hidden = self.model(
            input_ids,
            self._positions(seqs),
            meta,
            self.kv,
            inputs_embeds=self._embeds_with_images(seqs, input_ids),
        )
        rows, states = [], []
        end = 0
        for s in seqs:
            end += len(s.token_ids)
            if s.sample:
                rows.append(end - 1)
                states.append(self.seqs[s.request_id])
        if not rows:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=dev)])
        out = sample(logits, self._sampling_batch(states, logits.shape[-1]))
        token_ids = out.token_ids.tolist()
        lp = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        result = []
        for i, st in enumerate(states):
            st.output_token_ids.append(token_ids[i])
            k = st.new.sampling.logprobs
            logprobs = None
            if k is not None and lp is not None:
                top = (
                    [TokenLogprob(t, v) for t, v in zip(top_ids[i][:k], top_lps[i][:k])]
                    if top_ids is not None
                    else []
                )
                logprobs = PositionLogprobs(TokenLogprob(token_ids[i], lp[i]), top)
            result.append(SampledToken(st.new.request_id, token_ids[i], logprobs))
        return result

    def _positions(self, seqs: list[ScheduledSequence]) -> torch.Tensor:
        """Rotary positions: [T] for text models; [3, T] (M-RoPE) for VL models, prompt rows from
        the preprocessing stage and generated rows at index + delta on all three axes."""
        parts = []
        for s in seqs:
            start, end = s.start_pos, s.start_pos + len(s.token_ids)
            if not self.uses_mrope:
                parts.append(torch.arange(start, end))
                continue
            st = self.seqs[s.request_id]
            pos = st.mrope_positions
            delta = st.new.mrope_position_delta
            if pos is None:
                parts.append(torch.arange(start, end).expand(3, -1) + delta)
                continue
            n = pos.shape[1]
            head = pos[:, min(start, n) : min(end, n)]
            tail = torch.arange(max(start, n), max(end, n)).expand(3, -1) + delta
            parts.append(torch.cat([head, tail], dim=1))
        return torch.cat(parts, dim=-1).to(self.device)

    def _embeds_with_images(
        self, seqs: list[ScheduledSequence], input_ids: torch.Tensor
    ) -> torch.Tensor | None:
        """Token embeddings with image rows replaced by vision-encoder outputs, or None."""
        embeds = None
        row = 0
        for s in seqs:
            start, end = s.start_pos, s.start_pos + len(s.token_ids)
            for im in self.seqs[s.request_id].new.images:
                lo, hi = max(start, im.offset), min(end, im.offset + im.length)
                if lo >= hi:
                    continue
                if embeds is None:
                    embeds = self.model.embed(input_ids)
                out = self.encoder_cache.get(im.content_hash, lambda im=im: self._encode(im))
                embeds[row + lo - start : row + hi - start] = out[lo - im.offset : hi - im.offset]
            row += end - start
        return embeds

    def _encode(self, im: ImageInput) -> torch.Tensor:
        pixels = buffer_tensor(im.pixel_values).to(self.device, self.dtype)
        return self.model.encode_image(pixels, tuple(im.grid_thw))

    def _sampling_batch(self, states: list[SequenceState], vocab: int) -> SamplingBatch:
        sps = [s.new.sampling for s in states]
        asked = [sp.logprobs for sp in sps if sp.logprobs is not None]
        return SamplingBatch.build(
            temperatures=[sp.temperature for sp in sps],
            top_ps=[sp.top_p for sp in sps],
            top_ks=[sp.top_k for sp in sps],
            min_ps=[sp.min_p for sp in sps],
            presence_penalties=[sp.presence_penalty for sp in sps],
            frequency_penalties=[sp.frequency_penalty for sp in sps],
            repetition_penalties=[sp.repetition_penalty for sp in sps],
            min_tokens=[sp.min_tokens for sp in sps],
            stop_ids_for_min_tokens=[
                s.new.eos_token_ids + sp.stop_token_ids for s, sp in zip(states, sps)
            ],
            prompt_token_ids=[s.new.prompt_token_ids for s in states],
            output_token_ids=[s.output_token_ids for s in states],
            generators=[s.generator for s in states],
            max_logprobs=max(asked) if asked else -1,
            vocab_size=vocab,
            device=self.device,
        )
