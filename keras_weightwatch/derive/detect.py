"""The derivations of a Keras model's effective kernels (train begin, training thread).

Reads layer attributes only (`lora_enabled`, `quantization_mode` and the variables
behind them); calls no Keras function and computes nothing. A quantized
`ReversibleEmbedding` with untied weights has two effective kernels: its embeddings and its
output projection (`reverse_embeddings`). Quantization modes other
than int8, int4 and float8 (GPTQ, AWQ) have no rule: their stored kernel is shown.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..naming import key_layer
from ..run.format import Derivation
from .rules import ROUNDED_DTYPES

# The variables of each kind of kernel: the stored one, its LoRA adapters, its
# quantization scale and zero point (Embedding names them after its embeddings).
_KERNEL = ("_kernel", "lora_kernel_a", "lora_kernel_b", "kernel_scale", "kernel_zero")
_EMBEDDINGS = ("_embeddings", "lora_embeddings_a", "lora_embeddings_b", "embeddings_scale",
               "embeddings_zero")


def _names(layer: Any) -> tuple[str, ...]:
    return _EMBEDDINGS if hasattr(layer, "_embeddings") else _KERNEL


def _key(layer: Any, attr: str, keys: Mapping[int, str]) -> str | None:
    var = getattr(layer, attr, None)
    return None if var is None else keys.get(id(var))


def _scale_ops(layer: Any) -> list[list[Any]]:
    """`EinsumDense._adjust_scale_for_dequant` as data; an Embedding's scale is per row."""
    if hasattr(layer, "_embeddings"):
        return [["expand_dims", [-1]]]
    ops: list[list[Any]] = []
    if getattr(layer, "_kernel_squeeze_axes", None):
        ops.append(["expand_dims", list(layer._kernel_squeeze_axes)])
    if getattr(layer, "_kernel_expand_axes", None):
        ops.append(["squeeze", list(layer._kernel_expand_axes)])
    transpose = getattr(layer, "_kernel_transpose_axes", None)
    if transpose:
        ops.append(["transpose", sorted(range(len(transpose)), key=list(transpose).__getitem__)])
    return ops


def _quantized(layer: Any, keys: Mapping[int, str]) -> Derivation | None:
    mode = getattr(layer, "quantization_mode", None)
    if mode not in ("int8", "int4", "float8"):
        return None
    kernel, _, _, scale_attr, zero_attr = _names(layer)
    key, scale = _key(layer, kernel, keys), _key(layer, scale_attr, keys)
    if key is None or scale is None:
        return None
    if mode == "float8":
        return Derivation(key, "float8", {"kernel": key, "scale": scale},
                          {"dtype": "float8_e4m3fn"}, key_layer(key))
    inputs = {"codes": key, "scale": scale}
    params: dict[str, Any] = {}
    zero, g_idx = _key(layer, zero_attr, keys), _key(layer, "g_idx", keys)
    if zero is not None and g_idx is not None:
        inputs.update(zero=zero, g_idx=g_idx)
        params["group_axis"] = -1 if hasattr(layer, "_embeddings") else 0
    elif mode == "int8" or not hasattr(layer, "original_kernel_shape"):
        params["scale_ops"] = _scale_ops(layer)
    if mode == "int4":
        length = getattr(layer, "_int4_unpacked_column_size", None)
        params["length"] = int(length if length is not None else layer._orig_output_dim)
        shape = getattr(layer, "original_kernel_shape", None)
        if shape is not None:
            params["shape"] = [int(s) for s in shape]
    return Derivation(key, mode, inputs, params, key_layer(key))


def _reverse(layer: Any, keys: Mapping[int, str]) -> Derivation | None:
    """The untied output projection of a quantized `ReversibleEmbedding` (`reverse_embeddings`,
    (output_dim, input_dim), one scale per column; its int4 codes packed along the first axis,
    grouped along it by the layer's `g_idx`)."""
    mode = getattr(layer, "quantization_mode", None)
    key = _key(layer, "reverse_embeddings", keys)
    scale = _key(layer, "reverse_embeddings_scale", keys)
    if mode not in ("int8", "int4") or key is None or scale is None:
        return None
    inputs = {"codes": key, "scale": scale}
    params: dict[str, Any] = {}
    if mode == "int4":
        params.update(length=int(layer.output_dim), axis=0)
        zero, g_idx = _key(layer, "reverse_embeddings_zero", keys), _key(layer, "g_idx", keys)
        if zero is not None and g_idx is not None:
            inputs.update(zero=zero, g_idx=g_idx)
            params["group_axis"] = 0
    return Derivation(key, mode, inputs, params, key_layer(key))


def _lora(layer: Any, keys: Mapping[int, str]) -> Derivation | None:
    if not getattr(layer, "lora_enabled", False):
        return None
    kernel, a_attr, b_attr, _, _ = _names(layer)
    key, a, b = _key(layer, kernel, keys), _key(layer, a_attr, keys), _key(layer, b_attr, keys)
    if key is None or a is None or b is None:
        return None
    scale = float(layer.lora_alpha) / float(layer.lora_rank)
    return Derivation(key, "lora", {"base": key, "a": a, "b": b},
                      {"scale": scale, "rank": int(layer.lora_rank),
                       "alpha": float(layer.lora_alpha)}, key_layer(key))


def _layers(model: Any) -> list[Any]:
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    return list(getattr(model, "layers", []))


def _in_compute_dtype(d: Derivation, layer: Any) -> Derivation:
    """`d` with the layer's compute dtype where Keras casts the kernel to a narrower one: a
    LoRA `layer.kernel`, a float8 kernel's dequantization (int8 and int4 dequantize in their
    scale's own dtype, which the rule reads from the scale)."""
    dtype = str(getattr(layer, "compute_dtype", "float32"))
    if dtype not in ROUNDED_DTYPES or d.rule not in ("lora", "float8"):
        return d
    return dataclasses.replace(d, params={**d.params, "compute_dtype": dtype})


def derivations(model: Any, keys: Mapping[int, str]) -> tuple[Derivation, ...]:
    """Every effective kernel of the model's layers, nested ones included, in the order the
    derivations apply (a layer's dequantization before its LoRA update).

    Args:
        model: A built Keras model.
        keys: `id(variable)` -> the run's key for it.
    """
    out: list[Derivation] = []
    for layer in _layers(model):
        for detect in (_quantized, _reverse, _lora):
            d = detect(layer, keys)
            if d is not None:
                out.append(_in_compute_dtype(d, layer))
    return tuple(out)
