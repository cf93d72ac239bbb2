"""The wire codec: records round-trip exactly, buffers ride as raw frames, nothing is pickled."""

from __future__ import annotations

import pickle

import numpy as np
import orjson
import pytest

from core.codec import Buffer, CodecError, decode, encode
from protocols.messages import (
    EngineFacts,
    GenerateRequest,
    HealthReply,
    ImagePixels,
    PositionLogprobs,
    SamplingParams,
    ScheduledSequence,
    StepPlan,
    TokenBatch,
    TokenDelta,
    TokenLogprob,
)


def test_nested_record_round_trips_exactly() -> None:
    req = GenerateRequest(
        request_id="r1",
        sampling=SamplingParams(max_tokens=5, temperature=0.0, stop=["\n"], logprobs=2),
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    )
    back = decode(encode(req))
    assert back == req
    assert isinstance(back.sampling, SamplingParams)


def test_int_keyed_maps_round_trip_with_int_keys() -> None:
    req = GenerateRequest("r1", SamplingParams(logit_bias={42: -100.0, 7: 2.5}), prompt="x")
    back = decode(encode(req))
    assert back == req and back.sampling.logit_bias == {42: -100.0, 7: 2.5}
    # a key that is no integer stays as it came, for admission to refuse with a 400
    odd = GenerateRequest("r2", SamplingParams(logit_bias={"x": 1.0}), prompt="x")  # type: ignore[dict-item]
    assert decode(encode(odd)).sampling.logit_bias == {"x": 1.0}


def test_lists_of_nested_records_decode_to_dataclasses() -> None:
    batch = TokenBatch([TokenDelta("a", [1, 2], [PositionLogprobs(TokenLogprob(1, -0.5), [])])])
    back = decode(encode(batch))
    assert back == batch
    assert isinstance(back.deltas[0].logprobs[0].sampled, TokenLogprob)


def test_buffers_travel_as_extra_frames_zero_copy() -> None:
    pixels = np.arange(24, dtype=np.float32).reshape(2, 12)
    img = ImagePixels("r", "hash", [1, 2, 2], Buffer("float32", [2, 12], pixels.data))
    assert len(encode(TokenBatch([]))) == 1
    assert len(encode(StepPlan(1, [ScheduledSequence("r", 0, 1, [0], True)]))) == 1
    frames = encode(img)
    assert len(frames) == 2
    assert b"float32" in bytes(frames[0]) and pixels.tobytes() not in bytes(frames[0])
    back = decode(frames)
    buf = back.pixel_values
    assert np.frombuffer(buf.data, dtype=np.float32).reshape(buf.shape).tolist() == pixels.tolist()


def test_unknown_kind_and_garbage_raise_codec_error() -> None:
    with pytest.raises(CodecError):
        decode([orjson.dumps({"kind": "nope", "body": {}})])
    with pytest.raises(CodecError):
        decode([b"\x80\x04not json"])
    with pytest.raises(CodecError):
        decode([pickle.dumps({"kind": "generate"})])


def test_bad_field_types_raise_codec_error() -> None:
    frame = orjson.dumps({"kind": "generate", "body": {"request_id": "x", "sampling": 3}})
    with pytest.raises(CodecError):
        decode([frame])


def test_engine_facts_travel_typed_in_health_replies() -> None:
    facts = EngineFacts(4096, 100, 16, 1000, [2], "Qwen2ForCausalLM", "float32", 7, 2)
    back = decode(encode(HealthReply("h", True, facts)))
    assert back.facts == facts and back.facts.accepts_images
    assert EngineFacts.from_info({**facts.to_info(), "other_stage": 1}) == facts
