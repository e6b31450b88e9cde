"""How much each input feature moves the model's output: a ranking that is true for any layer stack.

A Dense kernel's row norm is not a feature's effect once the layer has
several units: a feature can have large weights into units that the rest of
the network ignores. This module ranks features by their measured effect
instead:

    score_i = std(x_i) * sum over output units u of mean over the sample of |∂y_u/∂x_i|

the mean absolute sensitivity of each output unit to the feature, scaled by
the feature's spread in the sample (so features of different scales compare),
summed over every unit of every model output (a feature that matters to any
output ranks high; `per_unit` keeps each unit's column, so a table can show
them apart). Units on very different scales weigh in proportion to their
scale. For a model that is linear in its input the mean |∂y_u/∂x_i| is
|(W1 W2 ...)_iu|, the product of its kernels; in general it is measured on
the sample, in inference mode, with `gradients.gradients`.

The features are the model's (single) input, flattened per example, or the
input of a named layer (e.g. the Dense layer a feature table describes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from keras_weightwatch.errors import received
from keras_weightwatch.gradients import Unit, gradients

MAX_ROWS = 4096  # the most rows (examples x units) in one gradient batch


@dataclasses.dataclass(frozen=True)
class FeatureSensitivity:
    """Each feature's effect on the model's output, measured on a sample.

    Attributes:
        scores: `(features,)` the ranked quantity: `std * mean_abs_gradient.sum(axis=1)`.
        per_unit: `(features, units)` `std * mean_abs_gradient`, one column per output unit.
        mean_abs_gradient: `(features, units)` mean over the sample of |∂y_u/∂x_i|.
        std: `(features,)` the feature's standard deviation in the sample.
        units: `(output, unit)` of each column.
        layer: The layer whose input the features are (None: the model's input).
    """

    scores: np.ndarray
    per_unit: np.ndarray
    mean_abs_gradient: np.ndarray
    std: np.ndarray
    units: tuple[tuple[int, int], ...]
    layer: str | None = None

    def ranking(self) -> np.ndarray:
        """Feature indices from the largest score to the smallest (ties by index)."""
        return np.argsort(-self.scores, kind="stable")


def feature_sensitivity(model: Any, x: Any, layer: str | None = None,
                        max_rows: int = MAX_ROWS) -> FeatureSensitivity:
    """Rank features by std(x_i) x the mean |∂y/∂x_i| summed over every output unit.

    Args:
        model: A Keras model (single input unless `layer` is given).
        x: A sample of the model's input (a few hundred examples suffice).
        layer: Measure at the input of this top-level layer instead of the
            model's input (a functional or Sequential model). Defaults to None.
        max_rows: The most rows (examples x output units) per gradient batch.
            Defaults to 4096.

    Returns:
        A `FeatureSensitivity`.

    Example: feature 1 has the larger spread but no weight, so no effect.

    >>> import keras
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False)])
    >>> model.set_weights([np.array([[2.0], [0.0]])])
    >>> s = feature_sensitivity(model, np.array([[0.0, 1.0], [2.0, 5.0]], "float32"))
    >>> s.std, s.scores, s.ranking()
    (array([1., 2.]), array([2., 0.]), array([0, 1]))
    """
    sample = np.asarray(x) if layer is None else x
    if layer is None and (isinstance(x, (list, tuple, dict)) or sample.ndim < 2):
        raise ValueError("feature_sensitivity measures one input of shape (examples, ...); "
                         "for a model with several inputs name the layer whose input the "
                         f"features are. Received: x of type {type(x).__name__}")
    n = len(sample) if layer is None else len(_first(x))
    if n < 2:
        raise ValueError(f"a sample needs at least 2 examples for a std. Received: n={n}")
    columns, values = [], None
    units = _output_units(model, x)
    for out_index, width in units:
        for chunk in _chunks(width, max(1, max_rows // n)):
            grads, feats = _unit_gradients(model, x, layer, out_index, chunk, n)
            values = feats if values is None else values
            columns.append(np.abs(grads).reshape(len(chunk), n, -1).mean(axis=1).T)
    mean_abs = np.concatenate(columns, axis=1)
    std = np.asarray(values, dtype=np.float64).reshape(n, -1).std(axis=0)
    per_unit = std[:, None] * mean_abs
    return FeatureSensitivity(
        scores=per_unit.sum(axis=1),
        per_unit=per_unit,
        mean_abs_gradient=mean_abs,
        std=std,
        units=tuple((o, u) for o, w in units for u in range(w)),
        layer=layer,
    )


def _first(x: Any) -> np.ndarray:
    if isinstance(x, dict):
        return np.asarray(next(iter(x.values())))
    if isinstance(x, (list, tuple)):
        return np.asarray(x[0])
    return np.asarray(x)


def _tile(x: Any, times: int) -> Any:
    """Each array of `x` repeated `times` times along the batch axis (whole sample after sample)."""
    import keras

    return keras.tree.map_structure(
        lambda a: np.tile(np.asarray(a), (times,) + (1,) * (np.ndim(a) - 1)), x)


def _output_units(model: Any, x: Any) -> list[tuple[int, int]]:
    import keras

    one = keras.tree.map_structure(lambda a: np.asarray(a)[:1], x)
    outs = keras.tree.flatten(model(one, training=False))
    return [(i, int(np.prod(o.shape[1:]))) for i, o in enumerate(outs)]


def _chunks(width: int, size: int) -> list[np.ndarray]:
    return [np.arange(s, min(s + size, width)) for s in range(0, width, size)]


def _unit_gradients(model: Any, x: Any, layer: str | None, output: int, chunk: np.ndarray,
                    n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-example gradients of each unit in `chunk`, one tiled copy of the sample per unit."""
    tiled = _tile(x, len(chunk))
    target = Unit(np.repeat(chunk, n), output)
    if layer is None:
        g = gradients(model, tiled, target, inputs=True)
        return np.asarray(g.inputs), np.asarray(x)
    g = gradients(model, tiled, target, layer=layer, layer_side="input")
    if g.activations is None or g.activation_gradients is None:
        raise ValueError(f"no tensor at the input of the layer. {received('layer', layer)}")
    return g.activation_gradients, g.activations[:n]
