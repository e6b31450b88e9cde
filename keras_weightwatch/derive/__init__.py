"""Effective kernels: the weights a layer computes with, derived from the weights it stores.

A LoRA layer computes with `base + (alpha / rank) * A @ B`, an int8 layer with its codes
divided by their scale, an int4 layer with two codes packed per byte. The run stores the
variables bit for bit as `get_weights()` returns them, and records in its header how each
effective kernel derives from them (`run.format.Derivation`); every view and analysis reads
the effective kernel under the stored kernel's key.

- `rules`: one pure numpy function per rule (`RULES`, one entry each), and `effective`,
  which applies a model's derivations to a snapshot's arrays.
- `detect`: the derivations of a Keras model's layers (train begin; reads layer
  attributes only).

Reading a run's effective kernels needs numpy (and ml_dtypes for float8) only.
"""

from .rules import (
    RULES,
    Rule,
    adapters,
    applies,
    chains,
    effective,
    effective_lookup,
    effective_shape,
    effective_shapes,
    lora_delta,
)

__all__ = [
    "RULES",
    "Rule",
    "adapters",
    "applies",
    "chains",
    "effective",
    "effective_lookup",
    "effective_shape",
    "effective_shapes",
    "lora_delta",
]
