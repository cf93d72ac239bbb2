"""QuantSpec: how a checkpoint's linear layers are quantized, and `install`, which puts empty
QuantizedLinear modules in their places. Used by models/loader.py and models/gguf_loader.py.

The linears are the decoder layers' four products (qkv, o, gate_up, down) and, where the spec
says so, the LM head; embeddings, norms and the vision tower keep the run dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.quant.linear import QuantizedLinear

LAYER_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class QuantSpec:
    """One scheme for a model's linears; `method` is the user-facing name (vLLM's where any)."""

    method: str
    bits: int | str  # 4, 8 or "fp8"
    group_size: int | None = None  # None: one group per row (per channel)
    symmetric: bool = True
    act_order: bool = False  # GPTQ act-order: inputs permuted (QuantizedLinear.input_perm)
    act_quant: str = "none"  # "int8_token": dynamic per-token int8 activations (w8a8)
    lm_head: bool = False  # the LM head is quantized too
    lm_head_bits: int | str | None = None  # the head's bits when they differ (quantize-at-load)


def _replace(parent: nn.Module, path: str, module: nn.Module) -> None:
    *owners, leaf = path.split(".")
    for name in owners:
        parent = getattr(parent, name)
    setattr(parent, leaf, module)


def empty_quantized(linear: nn.Linear, spec: QuantSpec, bits: int | str) -> QuantizedLinear:
    """A QuantizedLinear of `linear`'s shape, bias and device, its tensors still to be filled."""
    group = spec.group_size or linear.in_features
    return QuantizedLinear(
        linear.in_features,
        linear.out_features,
        bits=bits,
        group_size=group,
        symmetric=spec.symmetric,
        bias=linear.bias is not None,
        dtype=linear.weight.dtype,
        device=linear.weight.device,
        act_order=spec.act_order,
        act_quant=spec.act_quant,
    )


def quantized_paths(model: nn.Module, spec: QuantSpec) -> list[str]:
    """Module paths (as in model.named_modules) of the linears `spec` quantizes."""
    layers = getattr(model, "layers")  # noqa: B009 - the Decoder's layer list
    paths = [f"layers.{i}.{name}" for i in range(len(layers)) for name in LAYER_LINEARS]
    return paths + (["lm_head"] if spec.lm_head else [])


def install(model: nn.Module, spec: QuantSpec, paths: list[str] | None = None) -> None:
    """Replaces the linears `spec` covers (or those at `paths`) by empty QuantizedLinear modules
    (checkpoint formats then load their tensors by name). A tied LM head is untied: the
    embedding keeps its table."""
    for path in quantized_paths(model, spec) if paths is None else paths:
        linear = model.get_submodule(path)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{path} is a {type(linear).__name__}, not a linear layer")
        bits = spec.lm_head_bits if path == "lm_head" and spec.lm_head_bits else spec.bits
        _replace(model, path, empty_quantized(linear, spec, bits))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter (quantized ones at their stored size), tied tensors once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
