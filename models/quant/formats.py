"""Pre-quantized checkpoint formats (GPTQ, AWQ GEMM, compressed-tensors, fp8), read from
config.json's `quantization_config` and converted tensor by tensor into QuantizedLinear's
canonical layout (models/quant/linear.py). Called by models/loader.py before the weights load.

Layouts, as published:
- GPTQ (AutoGPTQ / GPTQModel, checkpoint_format gptq; gptq_v2 has no +1): qweight int32
  [K*b/32, N] packed along K; qzeros int32 [K/g, N*b/32] packed along N, holding zero - 1;
  scales [K/g, N]; g_idx [K] (act-order: the group of each input). w = (q - z) * s.
- AWQ GEMM: qweight int32 [K, N/8] and qzeros [K/g, N/8], packed along N in the order
  0 2 4 6 1 3 5 7; scales [K/g, N]. w = (q - z) * s.
- compressed-tensors: pack-quantized weight_packed int32 [N, K*b/32] along K of q + 2^(b-1)
  (q signed), weight_scale [N, K/g] (or [N, 1]), weight_zero_point packed along N;
  int-quantized int8 weight and weight_scale [N, 1] (w8a8 with dynamic per-token activations);
  float-quantized fp8 weight with weight_scale per tensor [1], channel [N, 1] or block.
- fp8 (transformers' FineGrainedFP8): fp8 weight and weight_scale_inv [N/128, K/128] blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from models.decoder import FUSED_SHARDS, HF_PREFIXES
from models.quant.linear import pack_int4
from models.quant.packing import expand_rows, unpack_awq, unpack_int32
from models.quant.spec import QuantSpec

FORMAT_NAMES = ("gptq", "awq", "compressed-tensors", "fp8")
# A module whose tensors include one of these parts is stored quantized.
MARKERS = frozenset({"qweight", "weight_packed", "weight_scale", "weight_scale_inv"})
DROPPED = frozenset({"input_scale", "input_zero_point", "weight_shape", "g_idx"})
Parts = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CheckpointFormat:
    """A checkpoint's quantization: the spec of its linears and the converter of one linear's
    tensors (by part name, e.g. qweight, scales) to QuantizedLinear's."""

    name: str
    spec: QuantSpec
    convert: Callable[[Parts], Parts]
    options: dict[str, Any] = field(default_factory=dict)


def _int_canonical(
    values: torch.Tensor, zeros: torch.Tensor | None, scales: torch.Tensor, bits: int, sym: bool
) -> Parts:
    """Canonical tensors of unsigned values [N, K] with w = (values - zeros) * scales, where
    zeros and scales are [N, G]; zeros None: w = (values - 2^(b-1)) * scales."""
    mid = 1 << (bits - 1)
    zeros_f = torch.full_like(scales, float(mid)) if zeros is None else zeros.float()
    if bits == 4:
        return {
            "qweight": pack_int4(values),
            "scales": scales,
            "offsets": -zeros_f * scales,
        }
    out = {"qweight": (values - mid).to(torch.int8), "scales": scales}
    if sym:
        if not torch.equal(zeros_f, torch.full_like(zeros_f, float(mid))):
            raise ValueError("a symmetric 8-bit checkpoint has zero points other than 128")
    else:
        out["offsets"] = (mid - zeros_f) * scales
    return out


def _act_order(values: torch.Tensor, g_idx: torch.Tensor, group: int) -> tuple[torch.Tensor, Parts]:
    """Columns sorted by group (so groups are contiguous) and the permutation that did it."""
    perm = torch.argsort(g_idx.long(), stable=True)
    expected = torch.arange(values.shape[1]) // group
    if not torch.equal(g_idx.long()[perm], expected):
        raise ValueError("GPTQ g_idx does not split the inputs into equal groups")
    return values[:, perm], {"input_perm": perm}


def gptq(qc: dict[str, Any]) -> CheckpointFormat:
    bits, group = int(qc["bits"]), int(qc.get("group_size", -1))
    if bits not in (4, 8):
        raise ValueError(f"GPTQ {bits}-bit weights are not supported (4 and 8 are)")
    act_order, sym = bool(qc.get("desc_act", False)), bool(qc.get("sym", True))
    v1 = qc.get("checkpoint_format", "gptq") == "gptq"

    def convert(p: Parts) -> Parts:
        values = unpack_int32(p["qweight"].t().contiguous(), bits)  # [N, K]
        zeros = unpack_int32(p["qzeros"], bits).t() + int(v1)  # [N, G]
        out: Parts = {}
        size = group if group > 0 else values.shape[1]
        if act_order:
            values, out = _act_order(values, p["g_idx"], size)
        scales = p["scales"].float().t().contiguous()
        return out | _int_canonical(values, zeros, scales, bits, sym and bits == 8)

    spec = QuantSpec(
        "gptq", bits, group if group > 0 else None, sym and bits == 8, act_order=act_order
    )
    return CheckpointFormat("gptq", spec, convert)


def awq(qc: dict[str, Any]) -> CheckpointFormat:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm" or int(qc.get("bits", 4)) != 4 or not qc.get("zero_point", True):
        raise ValueError(f"AWQ {version} / {qc.get('bits')}-bit: only 4-bit GEMM with zeros")

    def convert(p: Parts) -> Parts:
        values = unpack_awq(p["qweight"]).t()
        zeros = unpack_awq(p["qzeros"]).t()
        return _int_canonical(values, zeros, p["scales"].float().t().contiguous(), 4, False)

    group = int(qc.get("group_size", 128))
    spec = QuantSpec("awq", 4, group if group > 0 else None, symmetric=False)
    return CheckpointFormat("awq", spec, convert)


def _weight_group(args: dict[str, Any]) -> int | None:
    strategy = args.get("strategy")
    if strategy == "group":
        return int(args["group_size"])
    if strategy == "block":
        return int(args["block_structure"][1])
    return None


def _row_scales(scale: torch.Tensor, rows: int, args: dict[str, Any]) -> torch.Tensor:
    """weight_scale of any strategy as [N, G] fp32."""
    s = scale.float()
    if s.dim() == 0 or s.numel() == 1:
        return s.reshape(1, 1).expand(rows, 1).contiguous()
    if args.get("strategy") == "block":
        return expand_rows(s, int(args["block_structure"][0]), rows).contiguous()
    return s.reshape(rows, -1)


def compressed_tensors(qc: dict[str, Any]) -> CheckpointFormat:
    groups = list(qc.get("config_groups", {}).values())
    weights = [g.get("weights") for g in groups]
    if not groups or any(w != weights[0] for w in weights):
        raise ValueError("compressed-tensors: exactly one weight scheme is supported")
    args, group0 = weights[0], groups[0]
    fmt = group0.get("format") or qc.get("format")
    acts = group0.get("input_activations") or {}
    bits, kind, sym = int(args["num_bits"]), args.get("type", "int"), bool(args["symmetric"])
    if kind == "float":
        if bits != 8 or fmt not in ("float-quantized", "naive-quantized"):
            raise ValueError(f"compressed-tensors {fmt} float{bits} weights are not supported")
    elif bits not in (4, 8) or fmt not in ("pack-quantized", "int-quantized", "naive-quantized"):
        raise ValueError(f"compressed-tensors {fmt} int{bits} weights are not supported")
    act_quant = _ct_activations(acts)

    def convert(p: Parts) -> Parts:
        if "weight_packed" in p:
            rows, cols = (int(v) for v in p["weight_shape"].tolist())
            values = unpack_int32(p["weight_packed"], bits)[:, :cols]
        else:
            values = p["weight"]
            rows = values.shape[0]
        scales = _row_scales(p["weight_scale"], rows, args)
        if kind == "float":
            return {"qweight": values, "scales": scales}
        zeros = None
        if "weight_zero_point" in p:
            zp = p["weight_zero_point"]
            if "weight_packed" in p:
                zp = unpack_int32(zp.t().contiguous(), bits).t()[:rows] - (1 << (bits - 1))
            zeros = zp.reshape(rows, -1).float() + (1 << (bits - 1))
        if "weight_packed" not in p:  # int8 stored signed: back to unsigned like the others
            values = values.to(torch.int32) + (1 << (bits - 1))
        return _int_canonical(values, zeros, scales, bits, sym and bits == 8)

    spec = QuantSpec(
        "compressed-tensors",
        "fp8" if kind == "float" else bits,
        _weight_group(args),
        symmetric=sym and bits == 8,
        act_quant=act_quant,
    )
    return CheckpointFormat("compressed-tensors", spec, convert)


def _ct_activations(acts: dict[str, Any]) -> str:
    """QuantizedLinear.act_quant of compressed-tensors' input_activations (dynamic only)."""
    if not acts:
        return "none"
    kind, bits, strategy = acts.get("type"), acts.get("num_bits"), acts.get("strategy")
    if acts.get("dynamic") and bits == 8 and strategy in ("token", "group"):
        if kind == "int" and strategy == "token":
            return "int8_token"
        if kind == "float":
            return "fp8_token" if strategy == "token" else f"fp8_group{int(acts['group_size'])}"
    raise ValueError(
        f"compressed-tensors activations {kind}{bits} {strategy} (dynamic={acts.get('dynamic')}) "
        "are not supported: dynamic int8 per token and fp8 per token or group are"
    )


def fp8(qc: dict[str, Any]) -> CheckpointFormat:
    block = qc.get("weight_block_size")
    if block is None:
        raise ValueError("fp8 checkpoints without weight_block_size are not supported")
    args = {"strategy": "block", "block_structure": block}

    def convert(p: Parts) -> Parts:
        rows = p["weight"].shape[0]
        return {"qweight": p["weight"], "scales": _row_scales(p["weight_scale_inv"], rows, args)}

    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError("fp8 checkpoints with static activation scales are not supported")
    spec = QuantSpec("fp8", "fp8", int(block[1]), act_quant=f"fp8_group{int(block[1])}")
    return CheckpointFormat("fp8", spec, convert)


READERS: dict[str, Callable[[dict[str, Any]], CheckpointFormat]] = {
    "gptq": gptq,
    "awq": awq,
    "compressed-tensors": compressed_tensors,
    "fp8": fp8,
}


def checkpoint_format(qc: dict[str, Any] | None, forced: str) -> CheckpointFormat | None:
    """The format of a checkpoint's quantization_config (None: unquantized), checked against
    --quantization: a format name must match it, int8 / int4 need an unquantized checkpoint."""
    if qc is None:
        if forced in FORMAT_NAMES:
            raise ValueError(f"--quantization {forced}: the checkpoint has no quantization_config")
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in READERS:
        raise ValueError(f"quantization method {method!r} is not supported ({FORMAT_NAMES})")
    if forced not in ("none", method):
        raise ValueError(f"--quantization {forced}, but the checkpoint is quantized by {method}")
    return READERS[method](qc)


def module_path(hf_prefix: str) -> str:
    """Our module of an HF linear: model.layers.0.self_attn.q_proj -> layers.0.self_attn.qkv_proj."""
    name = hf_prefix
    for prefix in HF_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    parts = name.split(".")
    if parts[-1] in FUSED_SHARDS:
        parts[-1] = FUSED_SHARDS[parts[-1]][0]
    return ".".join(parts)


VISION = re.compile(r"(^|\.)visual\.")


def quantized_modules(names: Iterable[str]) -> dict[str, set[str]]:
    """HF module prefix -> its tensor parts, for the modules stored quantized."""
    parts: dict[str, set[str]] = {}
    for name in names:
        prefix, _, part = name.rpartition(".")
        parts.setdefault(prefix, set()).add(part)
    quantized = {p: s - {"bias"} for p, s in parts.items() if s & MARKERS}
    vision = sorted(p for p in quantized if VISION.search(p))
    if vision:
        raise ValueError(f"quantized vision tower weights are not supported ({vision[0]})")
    return quantized


def canonical_weights(
    weights: Iterable[tuple[str, torch.Tensor]],
    fmt: CheckpointFormat,
    modules: dict[str, set[str]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with each quantized module's parts (gathered across files)
    replaced by its canonical ones: <prefix>.qweight, .scales, .offsets, .input_perm."""
    pending: dict[str, Parts] = {}
    for name, tensor in weights:
        prefix, _, part = name.rpartition(".")
        if prefix not in modules or part == "bias":
            yield name, tensor
            continue
        got = pending.setdefault(prefix, {})
        got[part] = tensor
        if set(got) == modules[prefix]:
            del pending[prefix]
            for key, value in fmt.convert(got).items():
                if key not in DROPPED:
                    yield f"{prefix}.{key}", value
    if pending:
        raise ValueError(f"quantized tensors incomplete for {sorted(pending)[:4]}")
