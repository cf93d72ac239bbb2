"""The one wire codec: an orjson header frame plus raw buffer frames; nothing that can run code.

Every record that crosses a process boundary is a dataclass registered with `@wire`; tensors and
image bytes ride as `Buffer` values, sent as extra zero-copy frames described in the header.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union

import orjson

_REGISTRY: dict[str, type] = {}
_HINTS: dict[type, dict[str, Any]] = {}
_SCALARS = (int, float, str, bool)
T = TypeVar("T")


class CodecError(ValueError):
    """A frame that does not decode to a registered record."""


@dataclass
class Buffer:
    """Raw bytes with a dtype name and shape: a tensor or an image travelling as its own frame."""

    dtype: str
    shape: list[int]
    data: bytes | memoryview


def wire(kind: str):
    """Register a dataclass as a wire record with the given kind tag."""

    def register(cls: type[T]) -> type[T]:
        if kind in _REGISTRY:
            raise ValueError(f"wire kind {kind!r} registered twice")
        cls.KIND = kind  # type: ignore[attr-defined]
        _REGISTRY[kind] = cls
        return cls

    return register


class Record:
    """Base for wire records; `KIND` is set by `@wire`."""

    KIND: ClassVar[str] = ""


def encode(record: Any) -> list[bytes | memoryview]:
    """Record -> [header, *buffers]."""
    frames: list[bytes | memoryview] = []
    body = _to_plain(record, frames)
    header = orjson.dumps({"kind": type(record).KIND, "body": body})
    return [header, *frames]


def decode(frames: Sequence[bytes | memoryview | Any]) -> Any:
    """[header, *buffers] -> record. Unknown kinds and malformed headers raise CodecError."""
    try:
        header = orjson.loads(bytes(frames[0]))
        cls = _REGISTRY[header["kind"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError) as exc:
        raise CodecError(f"undecodable frame: {exc}") from exc
    buffers = [f.buffer if hasattr(f, "buffer") else f for f in frames[1:]]
    try:
        return _from_plain(cls, header["body"], buffers)
    except (TypeError, KeyError, ValueError, IndexError) as exc:
        raise CodecError(f"bad {header['kind']} record: {exc}") from exc


def _to_plain(value: Any, frames: list) -> Any:
    if isinstance(value, Buffer):
        frames.append(value.data)
        return {"__frame__": len(frames) - 1, "dtype": value.dtype, "shape": list(value.shape)}
    if dataclasses.is_dataclass(value):
        return {
            f.name: _to_plain(getattr(value, f.name), frames) for f in dataclasses.fields(value)
        }
    if isinstance(value, (list, tuple)):
        if value and type(value[0]) in _SCALARS:  # token ids, block tables: orjson takes them
            return value
        return [_to_plain(v, frames) for v in value]
    if isinstance(value, dict):  # JSON keys are strings: int keys (token ids) are written out
        return {k if isinstance(k, str) else str(k): _to_plain(v, frames) for k, v in value.items()}
    return value


def _int_key(key: str) -> int | str:
    """A key written from an int; any other string is kept for the receiver's checks to refuse."""
    try:
        return int(key)
    except ValueError:
        return key


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _from_plain(tp: Any, value: Any, buffers: list) -> Any:
    if value is None:
        return None
    if tp is Buffer:
        return Buffer(value["dtype"], value["shape"], buffers[value["__frame__"]])
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TypeError(f"{tp.__name__} expects an object")
        hints = _hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        return tp(**{k: _from_plain(hints[k], v, buffers) for k, v in value.items() if k in names})
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _from_plain(args[0], value, buffers) if len(args) == 1 else value
    if origin is dict and isinstance(value, dict) and typing.get_args(tp)[:1] == (int,):
        return {_int_key(k): v for k, v in value.items()}  # token-id keys, written as strings
    if origin is list:
        (arg,) = typing.get_args(tp)
        if arg in _SCALARS:
            if not isinstance(value, list):
                raise TypeError(f"expected a list, got {type(value).__name__}")
            return value
        return [_from_plain(arg, v, buffers) for v in value]
    return value
