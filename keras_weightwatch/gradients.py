"""Gradients of a model on a small batch, on the current Keras backend, as numpy arrays.

One function, `gradients`, differentiates one scalar of the model:

- `Loss(y)`: the model's compiled loss on `(x, y)` (with its regularization
  losses), the scalar Keras's train step differentiates, but in inference
  mode and without the loss scaling of a mixed-precision optimizer;
- `Unit(index)`: one output unit, summed over the batch. In inference mode
  examples do not interact, so the gradient of the sum with respect to the
  input is each example's own gradient; `index` may name one unit per example
  (or None: each example's predicted unit, the argmax of its output).

with respect to the trainable weights, the input, or the tensor a named layer
reads or writes (what Grad-CAM and feature sensitivities need). It runs the
model with `training=False` (no dropout, BatchNorm uses and keeps its moving
statistics), takes no optimizer step and writes no variable: the weights are
bit-identical before and after. The per-backend code is TensorFlow's
`GradientTape`, `jax.value_and_grad` over `model.stateless_call` (or over
`compute_loss_and_updates`, the function Keras's JAX train step
differentiates) and PyTorch's `torch.autograd.grad`; each imports its
framework lazily, so TensorFlow is never imported on JAX or PyTorch.

It needs the model, so it runs on the training thread; call it at a snapshot
through the callback's `self.model` (which syncs JAX state).

Dtypes: gradients come back in the dtype of what they are taken with
respect to, except that 16-bit floats come back as float32. Under a
mixed-precision policy (float32 variables, float16 compute) they are
computed through the float16 forward pass, so they carry its precision.

Layer tensors: the model is split at the layer into `front` (the model's
inputs to the layer's tensor) and `head` (the model's inputs and the layer's
tensor to the outputs, so connections that skip the layer still work). That
needs the layer's tensor in the model's graph: functional and Sequential
models have one; a subclassed model's `call()` is Python code, not a graph,
and is refused with a message saying so.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from keras_weightwatch.errors import received
from keras_weightwatch.naming import strip_model_prefix, unique_keys

LAYER_SIDES = ("output", "input")


@dataclasses.dataclass(frozen=True)
class Loss:
    """Differentiate the model's compiled loss on `(x, y)`.

    Attributes:
        y: The targets, as `fit` takes them.
        sample_weight: Optional per-example weights. Defaults to None.
    """

    y: Any
    sample_weight: Any = None


@dataclasses.dataclass(frozen=True)
class Unit:
    """Differentiate one output unit, summed over the batch.

    Attributes:
        index: The unit: an int for every example, one int per example, or
            None for each example's predicted unit (the argmax of its
            output). For outputs with more than one axis per example, the
            index into the example's flattened output. Defaults to None.
        output: Which of the model's outputs (position in its flattened
            outputs). Defaults to 0.
    """

    index: int | Sequence[int] | np.ndarray | None = None
    output: int = 0


@dataclasses.dataclass(frozen=True)
class Gradients:
    """What one call of `gradients` returns (numpy arrays throughout).

    Attributes:
        value: The scalar that was differentiated.
        outputs: The model's outputs on `x` (flattened, in inference mode).
        units: For a `Unit` target, the unit of each example; else None.
        weights: Weight key (as the run records it) -> gradient, in
            `model.trainable_weights` order; None unless asked for.
        inputs: The gradient with respect to `x`, in the structure of `x`;
            None unless asked for.
        activations: The layer's tensor on `x`; None without `layer`.
        activation_gradients: The gradient with respect to that tensor.
    """

    value: float
    outputs: tuple[np.ndarray, ...]
    units: np.ndarray | None = None
    weights: dict[str, np.ndarray] | None = None
    inputs: Any = None
    activations: np.ndarray | None = None
    activation_gradients: np.ndarray | None = None


def gradients(
    model: Any,
    x: Any,
    target: Loss | Unit,
    *,
    weights: bool = False,
    inputs: bool = False,
    layer: str | None = None,
    layer_side: str = "output",
) -> Gradients:
    """Gradients of a scalar of the model with respect to its weights, input or a layer's tensor.

    Args:
        model: A built Keras model.
        x: A batch the model takes: an array, or a list/tuple/dict of arrays
            for a model with several inputs.
        target: `Loss(y)` or `Unit(index)`.
        weights: Return the gradient of every trainable weight. Defaults to False.
        inputs: Return the gradient with respect to `x` (float inputs only).
            Defaults to False.
        layer: Return the named layer's tensor and the gradient with respect
            to it (only that: not with `weights` or `inputs`). Defaults to None.
        layer_side: `"output"` (the tensor the layer writes) or `"input"`
            (the tensor it reads). Defaults to `"output"`.

    Returns:
        A `Gradients` record.

    Example:

    >>> import keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    >>> model.set_weights([np.array([[2.0], [-3.0]])])
    >>> g = gradients(model, np.ones((1, 2), "float32"), Unit(0), inputs=True, weights=True)
    >>> g.inputs, g.weights  # d(2 x0 - 3 x1)/dx = the kernel; d/dW = x
    (array([[ 2., -3.]], dtype=float32), {'dense/kernel': array([[1.],
           [1.]], dtype=float32)})
    """
    _check_request(weights, inputs, layer, layer_side, target)
    _check_loss(model, target)
    if layer is not None:
        return _layer_gradients(model, x, target, layer, layer_side)
    flat, pack = _flatten(x)
    _check_inputs(model, flat, inputs)
    wrt_x = tuple(range(len(flat))) if inputs else ()
    raw = _BACKENDS[_backend()](model, flat, pack, target, weights, wrt_x)
    return Gradients(
        value=raw.value,
        outputs=raw.outputs,
        units=raw.units,
        weights=dict(zip(_trainable_keys(model), raw.weights)) if weights else None,
        inputs=pack(raw.inputs) if inputs else None,
    )


# ------------------------------------------------------------------ checks and helpers


@dataclasses.dataclass(frozen=True)
class _Raw:
    value: float
    outputs: tuple[np.ndarray, ...]
    units: np.ndarray | None
    weights: list[np.ndarray]
    inputs: list[np.ndarray]


def _check_request(
    weights: bool, inputs: bool, layer: str | None, side: str, target: Any
) -> None:
    if not isinstance(target, (Loss, Unit)):
        raise TypeError(f"`target` must be Loss(y) or Unit(index). {received('target', target)}")
    if layer is None and not (weights or inputs):
        raise ValueError(
            "nothing to differentiate with respect to: pass weights=True, inputs=True or "
            f"layer=<name>. Received: weights={weights}, inputs={inputs}, layer=None"
        )
    if layer is not None and (weights or inputs):
        raise ValueError(
            "with `layer`, only the gradient with respect to that layer's tensor is "
            "returned; ask for weights or inputs in a separate call. "
            f"Received: layer={layer!r}, weights={weights}, inputs={inputs}"
        )
    if side not in LAYER_SIDES:
        raise ValueError(f"`layer_side` must be one of {list(LAYER_SIDES)}. "
                         f"{received('layer_side', side)}")


def _check_loss(model: Any, target: Any) -> None:
    """A Loss target needs a loss (JAX's compute_loss would return 0 without one)."""
    if isinstance(target, Loss) and getattr(model, "loss", None) is None and not model.losses:
        raise ValueError(
            "Loss(y) differentiates the compiled loss; compile the model with a `loss` "
            "first (or use Unit(...)). Received: model.loss=None"
        )


def _backend() -> str:
    import keras

    name = str(keras.backend.backend())
    if name not in _BACKENDS:
        raise ValueError(
            f"gradients support the backends {sorted(_BACKENDS)}. {received('backend', name)}"
        )
    return name


def _flatten(x: Any) -> tuple[list[Any], Callable[[Sequence[Any]], Any]]:
    """The arrays of `x` in order, and a function that puts such a list back in x's shape."""
    if isinstance(x, dict):
        names = list(x)
        return [x[k] for k in names], lambda flat: dict(zip(names, flat))
    if isinstance(x, (list, tuple)):
        kind = type(x)
        return list(x), lambda flat: kind(flat)
    return [x], lambda flat: flat[0]


def _check_inputs(model: Any, flat: list[Any], want_inputs: bool) -> None:
    expected = _model_inputs(model)
    if expected is not None and len(expected) != len(flat):
        raise ValueError(
            f"the model takes {len(expected)} input(s); x holds {len(flat)} arrays. "
            f"Received: x with {len(flat)} arrays"
        )
    if want_inputs:
        for a in flat:
            dtype = _dtype(a)
            if "float" not in dtype:
                raise ValueError(
                    "gradients with respect to the input need float inputs (an integer "
                    f"input, e.g. token ids, has none). Received: x dtype={dtype}"
                )


def _model_inputs(model: Any) -> list[Any] | None:
    try:
        found = model.inputs
    except (AttributeError, ValueError):
        return None
    return list(found) if found is not None else None


def _trainable_keys(model: Any) -> list[str]:
    """The run's key of every trainable weight (as `capture.describe_model` makes them)."""
    paths = [str(getattr(v, "path", None) or v.name) for v in model.weights]
    keys = unique_keys([strip_model_prefix(p, model.name) for p in paths])
    by_id = {id(v): k for v, k in zip(model.weights, keys)}
    return [by_id[id(v)] for v in model.trainable_weights]


def _dtype(a: Any) -> str:
    """The dtype's Keras name (`"float32"`, `"int64"`, ...) of an array or backend tensor."""
    import keras

    return str(keras.backend.standardize_dtype(getattr(a, "dtype", None) or np.asarray(a).dtype))


def _host(t: Any) -> np.ndarray:
    import keras

    a = np.asarray(keras.ops.convert_to_numpy(t))
    if a.dtype.kind == "V" or (a.dtype.kind == "f" and a.dtype.itemsize < 4) or (
        a.dtype.name == "bfloat16"
    ):
        return a.astype(np.float32)
    return a


def _score(model: Any, x: Any, y_pred: Any, target: Loss | Unit) -> tuple[Any, Any]:
    """The scalar to differentiate (backend tensor) and, for a Unit, each example's unit."""
    from keras import ops, tree

    if isinstance(target, Loss):
        loss = model._compute_loss(
            x=x, y=target.y, y_pred=y_pred, sample_weight=target.sample_weight, training=False
        )
        return loss, None
    outs = tree.flatten(y_pred)
    if not 0 <= target.output < len(outs):
        raise ValueError(f"the model has {len(outs)} outputs. "
                         f"{received('Unit.output', target.output)}")
    y = ops.reshape(outs[target.output], (int(outs[target.output].shape[0]), -1))
    wide = "float64" if _dtype(y) == "float64" else "float32"
    y = ops.cast(y, wide)
    units = _units(y, target.index)
    mask = ops.one_hot(units, int(y.shape[1]), dtype=wide)
    return ops.sum(y * mask), units


def _units(y: Any, index: Any) -> Any:
    from keras import ops

    batch, width = int(y.shape[0]), int(y.shape[1])
    if index is None:
        return ops.argmax(ops.stop_gradient(y), axis=-1)
    if not isinstance(index, (int, np.integer, list, tuple, np.ndarray)):
        return index  # a tensor (traced under jax.jit): checked by the caller
    idx = np.broadcast_to(np.asarray(index, dtype=np.int64), (batch,)) if np.ndim(index) == 0 \
        else np.asarray(index, dtype=np.int64)
    if idx.shape != (batch,) or (idx.size and (idx.min() < 0 or idx.max() >= width)):
        raise ValueError(
            f"Unit.index must be an int or one int per example, each in [0, {width}) for an "
            f"output of {width} units and a batch of {batch}. {received('Unit.index', index)}"
        )
    return ops.convert_to_tensor(idx.astype("int32"))


class _KeepMetrics:
    """Puts the metric variables back (the compiled loss updates its trackers when called)."""

    def __init__(self, model: Any):
        self._vars = list(getattr(model, "metrics_variables", []))

    def __enter__(self) -> _KeepMetrics:
        self._saved = [np.array(v.numpy(), copy=True) for v in self._vars]
        return self

    def __exit__(self, *exc: object) -> None:
        for v, value in zip(self._vars, self._saved):
            v.assign(value)


# ------------------------------------------------------------------ the backends


def _tensorflow(model: Any, flat: list[Any], pack: Callable, target: Any,
                want_w: bool, wrt_x: tuple[int, ...]) -> _Raw:
    import tensorflow as tf

    xs = [tf.convert_to_tensor(a) for a in flat]
    variables = list(model.trainable_variables) if want_w else []
    sources = [v.value for v in variables] + [xs[i] for i in wrt_x]
    with _KeepMetrics(model), tf.GradientTape(watch_accessed_variables=False) as tape:
        for s in sources:
            tape.watch(s)
        y_pred = model(pack(xs), training=False)
        score, units = _score(model, pack(xs), y_pred, target)
    grads = tape.gradient(score, sources) if sources else []
    grads = [tf.zeros_like(s) if g is None else tf.convert_to_tensor(g)
             for g, s in zip(grads, sources)]
    return _raw(score, y_pred, units, grads, len(variables))


def _torch(model: Any, flat: list[Any], pack: Callable, target: Any,
           want_w: bool, wrt_x: tuple[int, ...]) -> _Raw:
    import keras
    import torch

    xs = [keras.ops.convert_to_tensor(a) for a in flat]
    xs = [t.detach().clone().requires_grad_(True) if i in wrt_x else t for i, t in enumerate(xs)]
    variables = [v.value for v in model.trainable_variables] if want_w else []
    with _KeepMetrics(model), torch.enable_grad():
        y_pred = model(pack(xs), training=False)
        score, units = _score(model, pack(xs), y_pred, target)
        sources = variables + [xs[i] for i in wrt_x]
        grads = list(torch.autograd.grad(score, sources, allow_unused=True)) if sources else []
    grads = [torch.zeros_like(s) if g is None else g for g, s in zip(grads, sources)]
    return _raw(score, y_pred, units, grads, len(variables))


def _jax(model: Any, flat: list[Any], pack: Callable, target: Any,
         want_w: bool, wrt_x: tuple[int, ...]) -> _Raw:
    import keras

    xs = [keras.ops.convert_to_tensor(a) for a in flat]
    is_loss = isinstance(target, Loss)
    index = None if is_loss or target.index is None else np.broadcast_to(
        np.asarray(target.index, dtype=np.int32), (int(xs[0].shape[0]),))
    key = (is_loss, want_w, wrt_x, _structure(pack(list(range(len(flat))))),
           None if is_loss else target.output, index is None)
    cache = _JAX_FNS.setdefault(model, {})
    if key not in cache:
        cache[key] = _jax_function(weakref.ref(model), pack, is_loss, want_w, wrt_x,
                                   None if is_loss else target.output)
    (score, (y_pred, units)), grads = cache[key](
        [v.value for v in model.trainable_variables],
        [xs[i] for i in wrt_x],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.metrics_variables],
        xs,
        target.y if is_loss else None,
        target.sample_weight if is_loss else None,
        None if index is None else keras.ops.convert_to_tensor(index),
    )
    if index is not None:  # checked on the host: a traced index has no values to check
        _units(keras.ops.reshape(keras.tree.flatten(y_pred)[target.output],
                                 (len(index), -1)), target.index)
    argnums = tuple(i for i, on in ((0, want_w), (1, bool(wrt_x))) if on)
    parts = dict(zip(argnums, grads))
    flat_grads = list(parts.get(0, [])) + list(parts.get(1, []))
    return _raw(score, y_pred, units, flat_grads, len(model.trainable_variables) if want_w else 0)


_JAX_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure(packed: Any) -> Any:
    """A hashable description of how `x` is structured (for the cache of jitted functions)."""
    if isinstance(packed, dict):
        return ("dict", tuple(packed))
    if isinstance(packed, (list, tuple)):
        return (type(packed).__name__, len(packed))
    return ("array",)


def _jax_function(ref: Any, pack: Callable, is_loss: bool, want_w: bool,
                  wrt_x: tuple[int, ...], output: int | None) -> Callable:
    """The jitted value-and-gradient function of one kind of request (one per model and kind).

    It holds the model by a weak reference, so the cache does not keep models alive.
    """
    import jax

    def scalar(tv: list[Any], xw: list[Any], ntv: list[Any], mv: list[Any], xs: list[Any],
               y: Any, sw: Any, index: Any) -> tuple[Any, tuple[Any, Any]]:
        model = ref()
        xv = list(xs)
        for i, t in zip(wrt_x, xw):
            xv[i] = t
        if is_loss:
            loss, (_, y_pred, _, _) = model.compute_loss_and_updates(
                tv, ntv, mv, pack(xv), y, sw, training=False
            )
            return loss, (y_pred, None)
        kwargs = {"training": False} if getattr(model, "_call_has_training_arg", True) else {}
        y_pred, _ = model.stateless_call(tv, ntv, pack(xv), **kwargs)
        score, units = _score(model, pack(xv), y_pred, Unit(index, output or 0))
        return score, (y_pred, units)

    argnums = tuple(i for i, on in ((0, want_w), (1, bool(wrt_x))) if on)
    return jax.jit(jax.value_and_grad(scalar, argnums, has_aux=True))


def _raw(score: Any, y_pred: Any, units: Any, grads: list[Any], n_weights: int) -> _Raw:
    from keras import tree

    host = [_host(g) for g in grads]
    return _Raw(
        value=float(_host(score)),
        outputs=tuple(_host(t) for t in tree.flatten(y_pred)),
        units=None if units is None else _host(units).astype(np.int64),
        weights=host[:n_weights],
        inputs=host[n_weights:],
    )


_BACKENDS: dict[str, Callable[..., _Raw]] = {
    "tensorflow": _tensorflow,
    "jax": _jax,
    "torch": _torch,
}


# ------------------------------------------------------------------ layer tensors


@dataclasses.dataclass(frozen=True)
class Split:
    """A model cut at one layer's tensor.

    Attributes:
        front: The model's inputs -> the layer's tensor.
        head: The model's inputs and the layer's tensor (last input) -> the outputs.
    """

    front: Any
    head: Any


_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def split_at(model: Any, layer: str, side: str = "output") -> Split:
    """Cut the model at the tensor the named layer writes (`side="output"`) or reads.

    Cached per model and layer. Raises ValueError for a subclassed model (no
    graph to cut), an unknown layer, or a layer called more than once.
    """
    cache = _SPLITS.setdefault(model, {})
    if (layer, side) not in cache:
        cache[(layer, side)] = _make_split(model, layer, side)
    return cache[(layer, side)]


def _make_split(model: Any, name: str, side: str) -> Split:
    import keras

    names = [lay.name for lay in getattr(model, "layers", [])]
    if name not in names:
        raise ValueError(f"the model has no top-level layer named {name!r}; its layers: "
                         f"{names}. {received('layer', name)}")
    inputs = _model_inputs(model)
    if inputs is None:
        raise ValueError(
            f"a layer's tensor is read from the model's graph, which functional and "
            f"Sequential models have; {type(model).__name__} {model.name!r} is a subclassed "
            "model whose call() is not a graph (rebuild it as a functional model, or use "
            f"inputs=True). Received: model={type(model).__name__}"
        )
    owner = model.get_layer(name)
    try:
        tensor = owner.output if side == "output" else owner.input
    except (AttributeError, ValueError) as e:
        raise ValueError(f"layer {name!r} has no single {side} tensor in the graph ({e}). "
                         f"{received('layer', name)}") from e
    front = keras.Model(inputs[0] if len(inputs) == 1 else inputs, tensor)
    head = keras.Model([*inputs, tensor], model.outputs)
    return Split(front, head)


def _layer_gradients(model: Any, x: Any, target: Any, name: str, side: str) -> Gradients:
    if isinstance(target, Loss):
        raise ValueError(
            "the gradient with respect to a layer's tensor is taken of an output unit; "
            f"use Unit(...). Received: target={target!r}"
        )
    import keras

    split = split_at(model, name, side)
    flat, _ = _flatten(x)
    _check_inputs(model, flat, False)
    xs = [keras.ops.convert_to_tensor(a) for a in flat]
    activations = split.front(xs[0] if len(xs) == 1 else xs, training=False)
    raw = _BACKENDS[_backend()](split.head, [*xs, activations], list, target, False, (len(xs),))
    return Gradients(
        value=raw.value,
        outputs=raw.outputs,
        units=raw.units,
        activations=_host(activations),
        activation_gradients=raw.inputs[-1],
    )
