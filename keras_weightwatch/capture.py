"""Model -> Snapshot: the only module that reads Keras state.

Everything here runs on the training thread, so it does as little as it can:
it walks the model once at train begin (`describe_model`) and, at each
snapshot, copies every weight to host memory (`capture_arrays`), exactly as
`layer.get_weights()` would return it. All further work happens elsewhere,
on numpy arrays.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One weight tensor of the model, as the run directory records it.

    Attributes:
        key: The name the run uses for the weight: `weight.path` without the
            model's own (process-numbered) name in front, e.g. `dense/kernel`.
        path: `weight.path` as Keras reported it when the run was written.
        layer: The path of the layer that owns the weight (`key` without its
            last component), used to group weights by layer.
        shape: The weight's shape.
        dtype: The weight's dtype name (`"float32"`, `"bfloat16"`, ...).
        trainable: False for non-trainable weights such as BatchNorm's
            moving statistics.
    """

    key: str
    path: str
    layer: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "path": self.path,
            "layer": self.layer,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "trainable": self.trainable,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WeightSpec:
        return cls(
            key=str(d["key"]),
            path=str(d["path"]),
            layer=str(d["layer"]),
            shape=tuple(int(s) for s in d["shape"]),
            dtype=str(d["dtype"]),
            trainable=bool(d["trainable"]),
        )


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """A top-level layer with its parameter counts, as `model.summary()` lists it."""

    name: str
    class_name: str
    params: int
    trainable_params: int
    non_trainable_params: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The architecture of a model: its layers and every weight's spec, in `model.weights` order."""

    name: str
    class_name: str
    layers: tuple[LayerInfo, ...]
    weights: tuple[WeightSpec, ...]

    @property
    def total_params(self) -> int:
        return sum(w.size for w in self.weights)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class_name": self.class_name,
            "total_params": self.total_params,
            "trainable_params": sum(w.size for w in self.weights if w.trainable),
            "non_trainable_params": sum(w.size for w in self.weights if not w.trainable),
            "layers": [layer.to_json() for layer in self.layers],
        }


def _strip_model_prefix(path: str, model_name: str) -> str:
    prefix = model_name + "/"
    if path.startswith(prefix) and len(path) > len(prefix):
        return path[len(prefix) :]
    return path


def _unique_keys(keys: Sequence[str]) -> list[str]:
    """Make keys unique by appending `#2`, `#3`, ... to repeats (Keras allows duplicate paths)."""
    seen: dict[str, int] = {}
    out = []
    for k in keys:
        n = seen.get(k, 0) + 1
        seen[k] = n
        out.append(k if n == 1 else f"{k}#{n}")
    return out


def _dtype_name(variable: Any) -> str:
    dtype = getattr(variable, "dtype", None)
    name = getattr(dtype, "name", None) or str(dtype)
    return str(name)


def _count(weights: Sequence[Any]) -> int:
    return int(sum(math.prod(tuple(w.shape)) for w in weights))


def describe_model(model: Any) -> ModelInfo:
    """Read the model's architecture: top-level layers and the spec of every weight.

    The model must be built (it is, by the time `fit` calls `on_train_begin`).
    """
    variables = list(model.weights)
    trainable_ids = {id(v) for v in model.trainable_weights}
    paths = [str(getattr(v, "path", None) or v.name) for v in variables]
    keys = _unique_keys([_strip_model_prefix(p, model.name) for p in paths])
    specs = []
    for v, path, key in zip(variables, paths, keys):
        base = key.split("#", 1)[0]
        layer = base.rsplit("/", 1)[0] if "/" in base else ""
        specs.append(
            WeightSpec(
                key=key,
                path=path,
                layer=layer,
                shape=tuple(int(s) for s in v.shape),
                dtype=_dtype_name(v),
                trainable=id(v) in trainable_ids,
            )
        )
    layers = []
    for layer in getattr(model, "layers", []):
        layers.append(
            LayerInfo(
                name=layer.name,
                class_name=type(layer).__name__,
                params=_count(layer.weights),
                trainable_params=_count(layer.trainable_weights),
                non_trainable_params=_count(layer.non_trainable_weights),
            )
        )
    return ModelInfo(
        name=model.name,
        class_name=type(model).__name__,
        layers=tuple(layers),
        weights=tuple(specs),
    )


def _host_copy(variable: Any) -> np.ndarray:
    """The variable's value as a numpy array that training can no longer change.

    This is `variable.numpy()`, which is what `layer.get_weights()` returns; it
    is copied again only where the backend hands out a view of live memory
    (PyTorch on CPU shares the parameter's storage).
    """
    arr = variable.numpy()
    if not isinstance(arr, np.ndarray):
        arr = np.asarray(arr)
    if arr.base is not None or not arr.flags.owndata or not arr.flags.c_contiguous:
        arr = np.array(arr, copy=True, order="C")
    return arr


def capture_arrays(model: Any) -> list[np.ndarray]:
    """Copy every weight of the model to host memory, in `model.weights` order."""
    return [_host_copy(v) for v in model.weights]


@dataclasses.dataclass
class Snapshot:
    """One capture of the model's weights, with the step it belongs to.

    Attributes:
        step: The TensorBoard step: the epoch index as Keras passes it to
            callbacks (0 after the first epoch), or one less than the first
            epoch for the initial weights.
        label: `"initial"` for the weights before training, else `"epoch"`.
        epoch: The epoch index Keras reported (None for the initial snapshot).
        arrays: Weight key -> numpy array.
        logs: The epoch's logs (loss, metrics) as floats.
        time: Wall-clock time of the capture (seconds since the epoch).
    """

    step: int
    label: str
    epoch: int | None
    arrays: dict[str, np.ndarray]
    logs: dict[str, float]
    time: float = dataclasses.field(default_factory=time.time)


def clean_logs(logs: Mapping[str, Any] | None) -> dict[str, float]:
    """The numeric entries of Keras's `logs` dict as plain floats (JSON-safe names kept)."""
    out: dict[str, float] = {}
    for name, value in (logs or {}).items():
        try:
            out[str(name)] = float(np.asarray(value))
        except (TypeError, ValueError):
            continue
    return out
