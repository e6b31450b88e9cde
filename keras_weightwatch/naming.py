"""The names the package reads from a model: weight keys, the model's name that groups its
views, and convolution layer classes.

A weight key is `weight.path` without the model's name (`dense/kernel`, `block/conv/bias`),
with `#2`, `#3`, ... appended to repeats. This module is the one place that takes keys
apart and the one list of which Keras layer classes are convolutions. Pure Python: no
Keras import.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

REPEAT_SEP = "#"
PATH_SEP = "/"


@dataclass(frozen=True)
class KeyParts:
    """A weight key taken apart: `block/conv/kernel#2` -> ("block/conv", "kernel", 2)."""

    layer: str
    """The layer path ("" for a weight of the model itself)."""
    name: str
    """The weight's own name, the last path component (`kernel`, `bias`, ...)."""
    repeat: int
    """1 for the first weight with this path, 2, 3, ... for repeats."""


def parse_key(key: str) -> KeyParts:
    """Split a weight key into its layer path, weight name and repeat number."""
    base, sep, repeat = key.partition(REPEAT_SEP)
    layer, _, name = base.rpartition(PATH_SEP)
    number = int(repeat) if sep and repeat.isdigit() else 1
    return KeyParts(layer=layer, name=name, repeat=number)


def key_layer(key: str) -> str:
    """The layer path of a weight key ("" when the key has no layer)."""
    return parse_key(key).layer


def key_name(key: str) -> str:
    """The weight's own name in a key: `kernel` for `block/conv/kernel#2`."""
    return parse_key(key).name


def strip_model_prefix(path: str, model_name: str) -> str:
    """`weight.path` without the model's (process-numbered) name in front."""
    prefix = model_name + PATH_SEP
    if path.startswith(prefix) and len(path) > len(prefix):
        return path[len(prefix) :]
    return path


def _snake_case(class_name: str) -> str:
    """Keras's default name stem for a class: `Sequential` -> `sequential`, `MyNet` -> `my_net`."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def model_group(name: str, class_name: str) -> str:
    """The name that groups a model's TensorBoard views: its name, with Keras's process
    counter removed from a default name (`sequential_1` -> `sequential`), so that the same
    model built twice in one process (two runs) lands in the same groups.

    A name the user chose is kept as it is (`digits_cnn`, `encoder_2`); an empty name
    (a run written before models were recorded) becomes `model`.

    >>> model_group("sequential_3", "Sequential"), model_group("my_net_1", "MyNet")
    ('sequential', 'my_net')
    >>> model_group("digits_cnn", "Sequential")
    'digits_cnn'
    """
    stem = _snake_case(class_name) if class_name else ""
    if stem and re.fullmatch(re.escape(stem) + r"(_\d+)?", name):
        return stem
    return name or "model"


def unique_keys(keys: Sequence[str]) -> list[str]:
    """Make keys unique by appending `#2`, `#3`, ... to repeats (Keras allows duplicate paths)."""
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        n = seen.get(k, 0) + 1
        seen[k] = n
        out.append(k if n == 1 else f"{k}{REPEAT_SEP}{n}")
    return out


# ------------------------------------------------------------ convolution classes


@dataclass(frozen=True)
class ConvKind:
    """What the package knows of one Keras convolution layer class."""

    class_name: str
    kernel: str
    """The attribute (and weight name) of the kernel that is drawn."""
    rgb: bool
    """Whether a kernel with 3 input channels may be drawn as colour images."""
    units_axis: int | None
    """The axis of the kernel's output units for matching (None: units not matched)."""
    matched_kernel: str
    """The weight name whose units are matched (`pointwise_kernel` for separable layers)."""


def _kinds() -> tuple[ConvKind, ...]:
    plain = ("Conv1D", "Conv2D", "Conv3D", "Convolution1D", "Convolution2D", "Convolution3D")
    transpose = ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
                 "Convolution2DTranspose", "Convolution3DTranspose")
    separable = ("SeparableConv1D", "SeparableConv2D", "SeparableConvolution1D",
                 "SeparableConvolution2D")
    depthwise = ("DepthwiseConv1D", "DepthwiseConv2D")
    return (
        tuple(ConvKind(n, "kernel", True, -1, "kernel") for n in plain)
        + tuple(ConvKind(n, "kernel", True, -2, "kernel") for n in transpose)
        + tuple(ConvKind(n, "depthwise_kernel", False, -1, "pointwise_kernel") for n in separable)
        + tuple(ConvKind(n, "kernel", False, None, "kernel") for n in depthwise)
    )


CONV_KINDS: dict[str, ConvKind] = {k.class_name: k for k in _kinds()}
"""Every Keras convolution layer class by name (aliases included)."""


def conv_kind(class_name: str | None) -> ConvKind | None:
    """The convolution kind of a layer class name, or None for a layer that is not one."""
    return CONV_KINDS.get(class_name or "")
