"""ModelRunner: the model, its paged KV cache and every request's executor-side state, with no I/O.
The executor stage hands it each StepPlan (and image pixels); it runs the forward and samples."""

from __future__ import annotations

import dataclasses
import gc

import torch

from actors.execution.decode_graphs import DecodeGraphs
from actors.execution.encoder_cache import EncoderCache
from actors.execution.kv_pool import KVLimits, KVPool, size_kv_pool
from actors.execution.pixel_store import PixelStore
from actors.execution.positions import decode_positions, step_positions
from actors.execution.prompt_logprobs import score_prompts
from actors.execution.rank_agreement import smallest_over_ranks
from actors.execution.sequence import SequenceState
from devices.base import Platform
from models.attention import AttentionMetadata, allocate_kv_cache, kv_cache_bytes_per_block
from models.decoder import Decoder
from models.grammar import Constraint, grammar_tokenizer
from models.loader import load_model, model_config
from models.mrope import mrope_positions
from models.parallel import TensorParallel, widest_rank_kv_heads
from models.quant.spec import weight_bytes
from models.qwen2_5_vl import Qwen2_5_VLModel
from models.sampler import SamplingBatch, sample
from protocols.messages import (
    EngineFacts,
    EngineRequest,
    ImagePixels,
    ImageRef,
    PositionLogprobs,
    PromptLogprobs,
    SampledToken,
    StepPlan,
    TokenLogprob,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelRunner:
    """Runs step plans on one device (one tensor-parallel rank).

    A request's state is made from the EngineRequest of the first plan that runs it and dropped
    when a plan lists it in finished_ids; a preemption leaves it alone, so a recompute reads the
    same prompt and output tokens. Pixels arrive separately (`add_pixels`), are held by the
    requests that sent them and dropped with them.
    """

    def __init__(
        self,
        model: Decoder,
        platform: Platform,
        pool: KVPool,
        *,
        max_num_seqs: int = 64,
        enforce_eager: bool = False,
        tp: TensorParallel | None = None,
        tokenizer: str | None = None,
    ) -> None:
        """Prepares `model` (as load_model returns it) for `platform`, allocates the KV pool
        and, unless `enforce_eager`, records decode steps of up to max_num_seqs sequences where
        the platform records graphs and reads the cache in place (CUDA)."""
        self.weight_bytes = weight_bytes(model)  # as checkpointed or quantized, before repacking
        platform.prepare_model(model)  # CPU: linears packed for oneDNN, quantized kernels
        if isinstance(model, Qwen2_5_VLModel) and not enforce_eager:
            model.visual.use_compiler(platform.compile)  # fused elementwise steps per image
        self.model = model
        self.pool = pool
        weight = model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        # One block past the pool's: the scratch block that recorded steps' padding rows write.
        self.kv = allocate_kv_cache(
            model.config,
            pool.num_blocks + 1,
            pool.block_size,
            self.device,
            self.dtype,
            platform.zeros,
        )
        self.uses_mrope = model.config.mrope_section is not None
        self.vision_batch_patches = platform.vision_batch_patches
        self.decode_kernel = platform.decode_attention()
        self.graphs: DecodeGraphs | None = None
        # Recorded steps serve one rank; tensor-parallel ranks (an all-reduce per layer) run
        # eagerly until graphs with collectives are tested on several GPUs.
        single = tp is None or tp.size == 1
        if not enforce_eager and single and platform.records_graphs and self.decode_kernel:
            self.graphs = DecodeGraphs(
                model,
                self.kv,
                platform,
                self.decode_kernel,
                max_batch=max_num_seqs,
                max_blocks=-(-pool.max_model_len // pool.block_size),
                block_size=pool.block_size,
                scratch_block=pool.num_blocks,
                mrope=self.uses_mrope,
            )
        self.tokenizer = tokenizer  # where structured outputs read the vocabulary from
        self.kv_bytes = sum(t.numel() * t.element_size() for pair in self.kv for t in pair)
        self.requests: dict[str, SequenceState] = {}
        self.prompt_logprobs: list[PromptLogprobs] = []  # since the last take_prompt_logprobs
        self.pixels = PixelStore()
        self.encoder_cache = EncoderCache()

    @classmethod
    def load(
        cls,
        model_path: str,
        platform: Platform,
        *,
        rank: int = 0,
        dtype: str = "auto",
        block_size: int = 16,
        limits: KVLimits | None = None,
        enforce_eager: bool = False,
        tp: TensorParallel | None = None,
        tokenizer: str | None = None,
        quantization: str = "none",
    ) -> ModelRunner:
        """Loads the checkpoint onto `platform`'s device for `rank` and sizes the KV pool in what
        memory is left (see kv_pool.size_kv_pool), so after the weights, quantized ones at their
        quantized size. dtype "auto": the platform's default. With `tp`, this rank's share of the
        weights and of the KV heads (models/parallel.py). `quantization`: see models/loader."""
        limits = limits or KVLimits()
        device = platform.torch_device(rank)
        torch_dtype = DTYPES[dtype] if dtype in DTYPES else platform.default_dtype()
        model = load_model(model_path, device, torch_dtype, tp, quantization)
        gc.collect()  # dense weights replaced by quantized ones are freed before memory is read
        config = model.config
        if tp is not None and tp.size > 1:  # every rank the same blocks: sized for the widest
            kv_heads = widest_rank_kv_heads(model_config(model_path), tp.size)
            config = dataclasses.replace(config, num_kv_heads=kv_heads)
        pool = size_kv_pool(
            limits,
            bytes_per_block=kv_cache_bytes_per_block(config, block_size, torch_dtype),
            block_size=block_size,
            max_position_embeddings=config.max_position_embeddings,
            free_bytes=smallest_over_ranks(platform.memory_free_bytes(device), device),
            host_ram=platform.memory_is_host_ram,
        )
        return cls(
            model,
            platform,
            pool,
            max_num_seqs=limits.max_num_seqs,
            enforce_eager=enforce_eager,
            tp=tp,
            tokenizer=tokenizer or model_path,
        )

    @property
    def facts(self) -> EngineFacts:
        c = self.model.config
        return EngineFacts(
            max_model_len=self.pool.max_model_len,
            num_blocks=self.pool.num_blocks,
            block_size=self.pool.block_size,
            vocab_size=c.vocab_size,
            eos_token_ids=list(c.eos_token_ids),
            architecture=c.architecture,
            dtype=str(self.dtype).removeprefix("torch."),
            image_token_id=c.image_token_id if self.uses_mrope else None,
            spatial_merge_size=c.spatial_merge_size or 2,
        )

    # ------------------------------------------------------------------ pixels and requests

    def add_pixels(self, msg: ImagePixels) -> None:
        self.pixels.add(msg)

    def missing_pixels(self, plan: StepPlan) -> set[str]:
        """Content hashes of images whose pixels a request new in `plan` has not yet sent."""
        finished = set(plan.finished_ids)
        return {
            im.content_hash
            for req in plan.new_requests
            if req.request_id not in finished
            for im in req.images
            if not self.pixels.holds(req.request_id, im.content_hash)
        }

    def release(self, request_id: str) -> None:
        """Forget a request that ended (finished, aborted, failed) and release its pixels."""
        self.requests.pop(request_id, None)
        self.pixels.release(request_id)

    def _admit(self, req: EngineRequest) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request {req.request_id} is already running on this executor")
        seed = req.sampling.seed
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        state = SequenceState(req, generator)
        c = self.model.config
        if self.uses_mrope:
            assert c.image_token_id is not None and c.spatial_merge_size is not None
            grids = [(im.grid_thw[0], im.grid_thw[1], im.grid_thw[2]) for im in req.images]
            positions, delta = mrope_positions(
                req.prompt_token_ids, grids, c.image_token_id, c.spatial_merge_size
            )
            state.mrope_positions, state.mrope_delta = torch.from_numpy(positions), delta
        elif req.images:
            raise ValueError(f"request {req.request_id} has images; {c.architecture} takes none")
        structured = req.sampling.structured
        if structured is not None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need the runner's tokenizer path")
            vocab = grammar_tokenizer(self.tokenizer, tuple(req.eos_token_ids))
            state.constraint = Constraint(structured.kind, structured.spec, vocab)
        self.requests[req.request_id] = state

    # ------------------------------------------------------------------ one step

    def execute(self, plan: StepPlan) -> list[SampledToken]:
        """Apply the plan's finished and new requests, run its sequences, sample where asked.

        Each sampled token is appended to its request's output; it is returned in plan order."""
        return self.execute_with_hidden(plan)[0]

    @torch.inference_mode()
    def execute_with_hidden(self, plan: StepPlan) -> tuple[list[SampledToken], torch.Tensor | None]:
        """`execute`, also returning the final hidden states [T, H] of every token the plan ran,
        in plan order (None when it ran none): for tests and diagnostics that need the logits
        of prompt positions (`runner.model.compute_logits(rows)`)."""
        for request_id in plan.finished_ids:
            self.release(request_id)
        finished = set(plan.finished_ids)
        for req in plan.new_requests:
            if req.request_id not in finished:
                self._admit(req)
        seqs = plan.sequences
        if not seqs:
            return [], None
        states: list[SequenceState] = []
        ids: list[int] = []
        for s in seqs:
            state = self.requests.get(s.request_id)
            if state is None:
                raise ValueError(f"plan runs request {s.request_id}, unknown to this executor")
            end = s.start_pos + s.num_tokens
            if s.sample and end != state.num_tokens:
                raise ValueError(
                    f"request {s.request_id}: sampling after position {end}, "
                    f"but its last token is at {state.num_tokens}"
                )
            if end > len(s.block_table) * self.pool.block_size:
                raise ValueError(f"request {s.request_id}: block table too short for {end}")
            ids.extend(state.token_ids(s.start_pos, end))
            states.append(state)
        spans = self._image_spans(plan, states)
        if (
            self.graphs is not None
            and not spans
            and len(seqs) <= self.graphs.max_batch
            and all(s.num_tokens == 1 for s in seqs)
        ):
            hidden = self.graphs.run(
                ids,
                decode_positions(plan, states, self.uses_mrope),
                [s.block_table for s in seqs],
                [s.start_pos + 1 for s in seqs],
            )
            self.prompt_logprobs += score_prompts(plan, states, hidden, self.model.compute_logits)
            return self._sample(plan, states, hidden), hidden
        positions = step_positions(plan, states)
        dev = self.device
        meta = AttentionMetadata.build(
            [s.num_tokens for s in seqs],
            [s.start_pos for s in seqs],
            [s.block_table for s in seqs],
            self.pool.block_size,
            dev,
            self.decode_kernel,
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        hidden = self.model(
            input_ids,
            positions.to(dev),
            meta,
            self.kv,
            inputs_embeds=self._embeds_with_images(spans, input_ids),
        )
        self.prompt_logprobs += score_prompts(plan, states, hidden, self.model.compute_logits)
        return self._sample(plan, states, hidden), hidden

    def take_prompt_logprobs(self) -> list[PromptLogprobs]:
        """The prompt logprobs computed since the last call (the executor sends them)."""
        out, self.prompt_logprobs = self.prompt_logprobs, []
        return out

    def _sample(
        self, plan: StepPlan, states: list[SequenceState], hidden: torch.Tensor
    ) -> list[SampledToken]:
        rows: list[int] = []
        sampling: list[SequenceState] = []
        end = 0
        for s, state in zip(plan.sequences, states, strict=True):
            end += s.num_tokens
            if s.sample:
                rows.append(end - 1)
                sampling.append(state)
        if not rows:
            return []
        if len(rows) == hidden.shape[0]:  # every row samples (decode steps): no gather
            logits = self.model.compute_logits(hidden)
        else:
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        constrained = [i for i, state in enumerate(sampling) if state.constraint is not None]
        if constrained:
            vocab = logits.shape[-1]
            masks = [sampling[i].constraint.allowed(vocab) for i in constrained]  # type: ignore[union-attr]
            index = torch.tensor(constrained, device=self.device)
            allowed = torch.stack(masks).to(self.device)
            logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        out = sample(logits, SamplingBatch.build(sampling, logits.shape[-1], self.device))
        token_ids = out.token_ids.tolist()
        lp = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        result = []
        for i, state in enumerate(sampling):
            state.output_token_ids.append(token_ids[i])
            if state.constraint is not None:
                state.constraint.accept(token_ids[i])
            k = state.sampling.logprobs
            logprobs = None
            if k is not None and lp is not None:
                top = []
                if top_ids is not None and top_lps is not None:
                    top = [TokenLogprob(t, v) for t, v in zip(top_ids[i][:k], top_lps[i][:k])]
                logprobs = PositionLogprobs(TokenLogprob(token_ids[i], lp[i]), top)
            result.append(SampledToken(state.request_id, token_ids[i], logprobs))
        return result

    def _image_spans(
        self, plan: StepPlan, states: list[SequenceState]
    ) -> list[tuple[int, int, int, ImageRef]]:
        """(row, lo, hi, image) for every image whose tokens lo..hi the step runs at `row`."""
        spans: list[tuple[int, int, int, ImageRef]] = []
        row = 0
        for s, state in zip(plan.sequences, states, strict=True):
            start, end = s.start_pos, s.start_pos + s.num_tokens
            for im in state.request.images:
                lo, hi = max(start, im.offset), min(end, im.offset + im.length)
                if lo < hi:
                    spans.append((row + lo - start, lo, hi, im))
            row += end - start
        return spans

    def _embeds_with_images(
        self, spans: list[tuple[int, int, int, ImageRef]], input_ids: torch.Tensor
    ) -> torch.Tensor | None:
        """Token embeddings with the image rows of `spans` replaced by vision-encoder outputs, or
        None. The images the encoder cache lacks are encoded in one batched pass."""
        if not spans:
            return None
        refs = {im.content_hash: im for _, _, _, im in spans}
        outputs = self.encoder_cache.get_many(
            list(refs), lambda keys: self._encode([refs[k] for k in keys])
        )
        embeds = self.model.embed(input_ids)
        for at, lo, hi, im in spans:
            out = outputs[im.content_hash]
            embeds[at : at + hi - lo] = out[lo - im.offset : hi - im.offset]
        return embeds

    def _encode(self, images: list[ImageRef]) -> list[torch.Tensor]:
        """Vision outputs of `images`, batched into one pass up to the platform's patch budget."""
        if not isinstance(self.model, Qwen2_5_VLModel):
            raise ValueError(f"{self.model.config.architecture} has no vision encoder")
        out: list[torch.Tensor] = []
        batch: list[tuple[torch.Tensor, tuple[int, int, int]]] = []
        patches = 0
        for im in images:
            grid = (im.grid_thw[0], im.grid_thw[1], im.grid_thw[2])
            size = grid[0] * grid[1] * grid[2]
            if batch and patches + size > self.vision_batch_patches:
                out += self.model.encode_images(batch)
                batch, patches = [], 0
            batch.append((self.pixels.get(im.content_hash, self.device, self.dtype), grid))
            patches += size
        if batch:
            out += self.model.encode_images(batch)
        return out
