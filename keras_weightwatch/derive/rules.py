"""The rules that derive a layer's effective kernel from stored weights (pure numpy).

Each rule is one entry of `RULES`: the roles it reads and a function
`(inputs: role -> array, params) -> float32 array`. A new way for a layer to derive
its kernel is one more entry here and one more case in `detect`.

The arithmetic follows Keras 3 step by step, in float32 (the compute dtype), so the
result equals Keras's own to float32 rounding:

- `lora`: `base + (alpha / rank) * A @ B` (`layer.kernel` of a LoRA Dense, EinsumDense,
  convolution; `layer.embeddings` of a LoRA Embedding).
- `int8`: `codes / scale`, the scale put in the kernel's layout (`scale_ops`).
- `int4`: the codes unpacked (two signed nibbles per byte, the low one first) to
  `length` along the last axis (or `axis`), then `codes / scale` (one scale per output unit), or
  `(codes - zero[g]) * scale[g]` per group `g = g_idx` (sub-channel), then reshaped to
  the kernel's `shape` where one is given (EinsumDense).
- `float8`: the kernel quantized to float8 (e4m3) with its scale and dequantized,
  as the layer's forward pass does.

A layer that computes in bfloat16 or float16 rounds as Keras does, the result kept in float32:
a derivation's `compute_dtype` param rounds its kernel to that dtype (LoRA's `layer.kernel` is
cast to it; float8's forward pass quantizes and dequantizes in it, kernel and scale cast to
it); int8 and int4 divide in their scale's dtype (16 bits only where the variables are: a
`mixed_*` policy dequantizes in float32).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..errors import WeightWatchError, received

if TYPE_CHECKING:  # the record is the run format's; reading it needs no rule
    from ..run.format import Derivation

Arrays = Mapping[str, np.ndarray]
Params = Mapping[str, Any]


class Rule(NamedTuple):
    """A rule: the roles its derivation's `inputs` name, those it may name, and its function."""

    roles: tuple[str, ...]
    optional: tuple[str, ...]
    apply: Callable[[Arrays, Params], np.ndarray]
    into: Callable[[Arrays, Params, np.ndarray | None], np.ndarray] | None = None
    """`apply` writing into a float32 array of the kernel's shape when one is given (a caller's
    buffer kept from one snapshot to the next, `effective(..., reuse=)`): a fresh array of
    64 MB cost about 25 ms of page faults at every snapshot, more than deriving into it."""


ROUNDED_DTYPES = ("bfloat16", "float16")
"""The dtypes a derived kernel is rounded to where Keras computes it in one (see the module
docstring); the result stays float32."""


def _rounded(out: np.ndarray, dtype: Any) -> np.ndarray:
    """`out` rounded to `dtype` and back to float32 where `dtype` is one of `ROUNDED_DTYPES`;
    else `out` as it is."""
    if dtype not in ROUNDED_DTYPES:
        return out
    import ml_dtypes

    narrow = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float16)
    return np.asarray(out).astype(narrow).astype(np.float32)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float32, copy=False)


LORA_BLOCK = 1 << 18
"""Multiply-adds of `A @ B` made at a time by `_lora`: a block of rows of the product, scaled
and added to the base while it is in cache. A product this small runs on the calling thread
(OpenBLAS spreads larger ones over its threads): a whole (4096, 8) @ (8, 4096) product took
about 3x the CPU on 2 cores, most of it threads waiting for each other."""


def _lora(x: Arrays, p: Params, out: np.ndarray | None = None) -> np.ndarray:
    base, a, b = np.asarray(x["base"]), _f32(x["a"]), _f32(x["b"])
    if a.ndim < 2 or b.ndim != 2 or base.shape != a.shape[:-1] + b.shape[1:]:
        return _f32(base) + lora_delta(x, p)  # shapes that broadcast: as Keras does
    if (out is None or out.shape != base.shape or out.dtype != np.float32
            or not out.flags.c_contiguous or np.may_share_memory(out, base)):
        out = np.empty(base.shape, np.float32)
    flat, rows_of = out.reshape(-1, b.shape[1]), a.reshape(-1, b.shape[0])
    bases, scale = base.reshape(flat.shape), np.float32(p["scale"])
    step = max(1, LORA_BLOCK // max(1, b.size))
    for i in range(0, flat.shape[0], step):
        block = flat[i : i + step]
        np.matmul(rows_of[i : i + step], b, out=block)
        np.multiply(block, scale, out=block)
        np.add(_f32(bases[i : i + step]), block, out=block)
    return out


def lora_delta(x: Arrays, p: Params) -> np.ndarray:
    """The update a LoRA layer adds to its base kernel: `(alpha / rank) * A @ B`, float32."""
    return np.float32(p["scale"]) * np.matmul(_f32(x["a"]), _f32(x["b"]))


def _layout(scale: np.ndarray, ops: Sequence[Sequence[Any]]) -> np.ndarray:
    """The scale put in the kernel's layout: `expand_dims`, `squeeze` and `transpose` in order
    (what `EinsumDense._adjust_scale_for_dequant` does)."""
    for op, arg in ops:
        if op == "expand_dims":
            scale = np.expand_dims(scale, tuple(arg))
        elif op == "squeeze":
            scale = np.squeeze(scale, tuple(arg))
        elif op == "transpose":
            scale = np.transpose(scale, tuple(arg))
        else:
            raise ValueError(f"unknown scale layout operation {op!r}")
    return scale


def _dequantize(codes: np.ndarray, x: Arrays, p: Params) -> np.ndarray:
    scale = _layout(_f32(x["scale"]), p.get("scale_ops", ()))
    if "zero" in x:  # sub-channel: one scale and zero point per group of inputs
        axis = int(p.get("group_axis", 0))
        groups = np.asarray(x["g_idx"]).astype(np.int64)
        s = np.take(scale, groups, axis=axis)
        z = np.take(_f32(x["zero"]), groups, axis=axis)
        out = (codes - z) * s
    else:
        out = codes / scale
    out = _rounded(out, np.asarray(x["scale"]).dtype.name)
    shape = p.get("shape")
    return out.reshape(tuple(shape)) if shape else out


def _int8(x: Arrays, p: Params) -> np.ndarray:
    return _dequantize(_f32(x["codes"]), x, p)


def unpack_int4(packed: np.ndarray, length: int, axis: int = -1) -> np.ndarray:
    """Signed 4-bit codes packed two per byte along `axis` (the low nibble holds the even
    position), unpacked to `length` int8 codes in [-8, 7] along that axis."""
    b = np.moveaxis(np.asarray(packed).astype(np.int8, copy=False), axis, -1)
    low = np.left_shift(b, 4) >> 4
    high = b >> 4
    both = np.stack([low, high], axis=-1).reshape(*b.shape[:-1], 2 * b.shape[-1])
    return np.moveaxis(both[..., :length], -1, axis)


def _int4(x: Arrays, p: Params) -> np.ndarray:
    codes = unpack_int4(x["codes"], int(p["length"]), int(p.get("axis", -1)))
    return _dequantize(_f32(codes), x, p)


def _float8(x: Arrays, p: Params) -> np.ndarray:
    import ml_dtypes

    dtype = getattr(ml_dtypes, str(p.get("dtype", "float8_e4m3fn")))
    top = np.float32(float(ml_dtypes.finfo(dtype).max))
    compute = p.get("compute_dtype")  # the forward pass quantizes in it, scale and all
    scale = _rounded(_f32(x["scale"]), compute)
    q = np.clip(_rounded(_rounded(_f32(x["kernel"]), compute) / scale, compute), -top, top)
    q = q.astype(dtype)
    return q.astype(np.float32) * scale


RULES: dict[str, Rule] = {
    "lora": Rule(("base", "a", "b"), (), _lora, _lora),
    "int8": Rule(("codes", "scale"), (), _int8),
    "int4": Rule(("codes", "scale"), ("zero", "g_idx"), _int4),
    "float8": Rule(("kernel", "scale"), (), _float8),
}
"""Every rule by name: the roles it needs, the roles it may use, and its function."""


def applies(d: Derivation, keys: Any) -> bool:
    """Whether `d` can be applied where the weights `keys` are present (a snapshot taken before
    LoRA was enabled, or before the model was quantized, holds no adapter or scale: its
    stored kernel is the one the layer computed with)."""
    return d.rule in RULES and d.key in keys and all(k in keys for k in d.inputs.values())


def _derive(d: Derivation, current: Mapping[str, np.ndarray],
            reuse: MutableMapping[str, np.ndarray] | None = None) -> np.ndarray:
    rule = RULES[d.rule]
    inputs = {role: current[key] for role, key in d.inputs.items()}
    try:
        if reuse is not None and rule.into is not None:
            made = reuse[d.key] = rule.into(inputs, d.params, reuse.get(d.key))
        else:
            made = rule.apply(inputs, d.params)
        out = _rounded(made, d.params.get("compute_dtype"))
    except (ValueError, IndexError, KeyError, TypeError) as e:
        raise WeightWatchError(
            f"the effective kernel {d.key!r} ({d.rule}) cannot be derived from "
            f"{dict(d.inputs)}: {e}. {received('params', dict(d.params))}") from e
    return np.ascontiguousarray(out, dtype=np.float32)


def effective(arrays: Mapping[str, np.ndarray], derived: Sequence[Derivation],
              reuse: MutableMapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """`arrays` with each derived key replaced by its effective kernel (float32), the
    derivations applied in order (a LoRA on a quantized kernel reads the dequantized one).
    Derivations whose inputs are not all present are skipped; every other array is
    passed through as it is.

    `reuse`: arrays kept by the caller, by derived key, that a rule with `Rule.into` writes
    the kernel into (and stores the array it wrote there): the kernels returned by an
    earlier call with the same `reuse` are overwritten.
    """
    out = dict(arrays)
    for d in derived:
        if applies(d, out):
            out[d.key] = _derive(d, out, reuse)
    return out


def chains(derived: Sequence[Derivation]) -> dict[str, tuple[Derivation, ...]]:
    """Each derived key -> its derivations, in the order they apply (a LoRA on a quantized
    kernel: two)."""
    out: dict[str, list[Derivation]] = {}
    for d in derived:
        out.setdefault(d.key, []).append(d)
    return {k: tuple(v) for k, v in out.items()}


def effective_lookup(get: Callable[[str], np.ndarray | None], derived: Sequence[Derivation],
                     reuse: MutableMapping[str, np.ndarray] | None = None
                     ) -> Callable[[str], np.ndarray | None]:
    """A function key -> array like `get` (which returns None for a weight it lacks), that
    returns the effective kernel for a derived key: reads only the inputs that key needs
    (`reuse` as for `effective`)."""
    by_key = chains(derived)

    def lookup(key: str) -> np.ndarray | None:
        chain = by_key.get(key)
        if not chain:
            return get(key)
        needed = {k for d in chain for k in d.inputs.values()} | {key}
        arrays = {k: a for k in needed if (a := get(k)) is not None}
        return effective(arrays, chain, reuse).get(key)

    return lookup


def effective_shape(d: Derivation, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """The effective kernel's shape, from the stored shapes of its inputs (no array read)."""
    if d.rule == "int4":
        if d.params.get("shape"):
            return tuple(int(s) for s in d.params["shape"])
        codes = list(shapes[d.inputs["codes"]])
        codes[int(d.params.get("axis", -1))] = int(d.params["length"])
        return tuple(codes)
    return tuple(int(s) for s in shapes[d.key])


def effective_shapes(derived: Sequence[Derivation], shapes: Mapping[str, Sequence[int]]
                     ) -> dict[str, tuple[int, ...]]:
    """`shapes` (the stored weights', in their order) with each derived key's shape that of
    its effective kernel where its derivations apply (no array read)."""
    out = {k: tuple(int(s) for s in v) for k, v in shapes.items()}
    for d in derived:
        if applies(d, out):
            out[d.key] = effective_shape(d, out)
    return out


def adapters(derived: Sequence[Derivation]) -> dict[str, tuple[str, ...]]:
    """Each LoRA layer's kernel key -> the keys of its adapters (A, then B)."""
    return {d.key: (d.inputs["a"], d.inputs["b"]) for d in derived if d.rule == "lora"}
