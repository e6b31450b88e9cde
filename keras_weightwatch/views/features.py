"""`FeatureView`: the top-k input features of a Dense layer, with their names."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence, Set
from typing import Any

import numpy as np

from ..capture import ModelInfo, Snapshot
from ..errors import received
from ..naming import key_layer
from ..settings import Settings
from .base import (
    Stats,
    View,
    all_layers,
    find_layer,
    keras_module,
    model_inputs,
    variable_key,
    weight_keys,
)

# A feature layer with at most this many input features gets one scalar per feature at every
# snapshot; a wider one (a Dense layer after a Flatten) gets scalars only for the features in
# the snapshot's top-k table.
MAX_FEATURE_SCALARS = 100

# Layers that keep each input feature in its own position (feature names still apply after them).
_FEATURE_PRESERVING = {
    "Normalization",
    "Rescaling",
    "Dropout",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "SpatialDropout1D",
    "BatchNormalization",
    "LayerNormalization",
    "Activation",
    "ReLU",
    "LeakyReLU",
    "ELU",
    "PReLU",
    "Softmax",
    "Identity",
    "UnitNormalization",
    "ActivityRegularization",
}


def _fed_by(t: Any, inputs: set[int]) -> bool:
    """Whether tensor `t` is a model input, possibly through feature-preserving layers."""
    for _ in range(100):
        if id(t) in inputs:
            return True
        hist = getattr(t, "_keras_history", None)
        op = None if hist is None else hist[0]
        if op is None or type(op).__name__ not in _FEATURE_PRESERVING:
            return False
        try:
            t = op.input
        except (AttributeError, ValueError):
            return False
        if isinstance(t, (list, tuple)):
            return False
    return False


def _input_fed_dense(model: Any) -> Any | None:
    """The first Dense layer fed by a model input, possibly through feature-preserving layers."""
    keras = keras_module()
    inputs = {id(t) for t in model_inputs(model)}
    if not inputs:
        return None
    for layer in all_layers(model):
        if not isinstance(layer, keras.layers.Dense):
            continue
        try:
            t = layer.input
        except (AttributeError, ValueError):
            continue
        if _fed_by(t, inputs):
            return layer
    return None


SENSITIVITY_SAMPLE = 256  # the most rows of feature_data the sensitivity is measured on


def _input_features(model: Any, layer: Any, n_in: int) -> bool:
    """Whether `feature_data` can be fed to the model: one input of shape (None, n_in) that
    feeds the layer (through feature-preserving layers)."""
    inputs = model_inputs(model)
    if len(inputs) != 1 or tuple(inputs[0].shape)[1:] != (n_in,):
        return False
    try:
        return _fed_by(layer.input, {id(inputs[0])})
    except (AttributeError, ValueError):
        return False


class FeatureView(View):
    """The top-k input features of a Dense layer by weight magnitude, with their names.

    Writes a Markdown table (text dashboard) and one scalar per feature: its
    weight for a one-unit layer, else the L2 norm of its row over the units.
    A layer with more than `max_feature_scalars` input features (a Dense
    layer after a Flatten has thousands) gets scalars only for the features
    in that snapshot's top-k table: the tags are the same
    (`features/<layer>/<name>`), there are just fewer of them, and a
    feature's series has points only at the snapshots where it ranked in the
    top k.

    With `feature_data` and several units the table ranks by each feature's measured
    effect on the output (`sensitivity`), and the snapshot stores the effects with
    the kernel's statistics (`effect/<i>`, up to `max_feature_scalars` features), so
    that `diff` compares that ranking.

    Args:
        feature_names: One name per input feature. Defaults to None:
            `feature_0`, `feature_1`, ...
        top_k: Rows in the table. Defaults to 5.
        feature_layer: The Dense layer's name. Defaults to None: the first
            Dense layer fed by the model input (through preprocessing layers
            such as `Normalization`).
        feature_data: A sample of inputs `(samples, features)` for the
            correlation flags and standardized weights. Defaults to None.
        max_feature_scalars: The most input features that each get a scalar
            at every snapshot. Defaults to `MAX_FEATURE_SCALARS` (100).
    """

    name = "features"

    def __init__(
        self,
        feature_names: Sequence[str] | None = Settings.feature_names,
        top_k: int = Settings.top_k,
        feature_layer: str | None = Settings.feature_layer,
        feature_data: np.ndarray | None = Settings.feature_data,
        max_feature_scalars: int = MAX_FEATURE_SCALARS,
    ):
        self.feature_names = None if feature_names is None else list(feature_names)
        self.max_feature_scalars = max_feature_scalars
        self.top_k = top_k
        self.feature_layer = feature_layer
        self.feature_data = feature_data
        self.layer_name = ""
        self.key: str | None = None
        self.units = 1
        self.names: list[str] = []
        self.tags: list[str] = []
        self._data: Any = None  # FeatureData of feature_data, made at the first write
        self.sensitivity = False  # rank by the measured effect on the output (see prepare)

    def _layer(self, model: Any) -> Any:
        """The Dense layer whose kernel the table reads."""
        keras = keras_module()
        if self.feature_layer is not None:
            layer = find_layer(model, self.feature_layer, "feature_layer")
            if not isinstance(layer, keras.layers.Dense):
                raise ValueError(
                    f"`feature_layer` must name a Dense layer; {layer.name!r} is a "
                    f"{type(layer).__name__}. {received('feature_layer', self.feature_layer)}"
                )
        else:
            layer = _input_fed_dense(model)
            if layer is None:
                raise ValueError(
                    "the top-k feature table needs a Dense layer fed by the model input, and this "
                    "model has none; pass `feature_layer=` with the name of a Dense layer. "
                    f"{received('feature_layer', None)}"
                )
        if not layer.built:
            raise ValueError(f"`feature_layer`: layer {layer.name!r} is not built yet.")
        return layer

    def _check_inputs(self, layer: Any, n_in: int) -> list[str]:
        """The feature names, checked (with `feature_data`) against the layer's inputs."""
        names = self.feature_names
        if names is None:
            names = [f"feature_{i}" for i in range(n_in)]
        elif len(names) != n_in:
            raise ValueError(
                f"`feature_names` has {len(names)} names but layer {layer.name!r} has {n_in} input "
                f"features. {received('feature_names', self.feature_names)}"
            )
        data = self.feature_data
        if data is not None and (data.ndim != 2 or data.shape[1] != n_in):
            raise ValueError(
                f"`feature_data` must have shape (samples, {n_in}) for layer {layer.name!r}. "
                f"Received: feature_data with shape {data.shape}"
            )
        return list(names)

    def prepare(self, model: Any, info: ModelInfo) -> None:
        layer = self._layer(model)
        n_in, units = (int(s) for s in layer.kernel.shape)
        self.names = self._check_inputs(layer, n_in)
        # Its statistics are made once per fit by the worker, at the first write (the
        # correlations of many features take a while): not on the training thread.
        self._data = None
        key = variable_key(layer, "kernel", weight_keys(model, info))
        if key is None:
            raise ValueError(f"`feature_layer`: the kernel of {layer.name!r} is not one of the "
                             f"model's weights. {received('feature_layer', layer.name)}")
        self.key = key
        self.layer_name = key_layer(self.key) or layer.name
        self.units = units
        self.sensitivity = units > 1 and self.feature_data is not None and _input_features(
            model, layer, n_in)
        self.tags = []  # made by the worker at the first write: thousands of names take a while

    def restrict(self, keys: Set[str]) -> None:
        if self.key not in keys:
            raise ValueError(
                f"the top-k feature table reads {self.key!r}, which `include`/`exclude` leave "
                f"out; include it or drop `feature_names`. Received: feature weight={self.key!r}"
            )

    def _feature_tags(self) -> list[str]:
        """One scalar tag per feature, unique (a name that cleans to a tag already taken
        gets its index appended)."""
        if len(self.tags) != len(self.names):
            from ..summaries import tag, tags_under

            table = tag("features", self.layer_name)
            tags = tags_under(table, self.names)
            if table in tags or len(set(tags)) != len(tags):
                tags, seen = list(tags), set()
                for i, t in enumerate(tags):
                    if t in seen or t == table:
                        t = tags[i] = f"{t}_{i}"
                    seen.add(t)
            self.tags = tags
        return self.tags

    def capture(self, model: Any) -> np.ndarray | None:
        """With several units and `feature_data`: each feature's std x mean |d output/d x_i|."""
        if not self.sensitivity or self.feature_data is None:
            return None
        from ..sensitivity import feature_sensitivity

        dtype = str(getattr(model_inputs(model)[0], "dtype", None) or "float32")
        sample = np.asarray(self.feature_data[:SENSITIVITY_SAMPLE], dtype=dtype)
        return feature_sensitivity(model, sample).scores

    def _ranked(self, kernel: np.ndarray, payload: Any) -> tuple[np.ndarray, str, str]:
        """The ranked quantity per feature, what the heading says of it, the column's name."""
        from ..features import feature_weights

        if payload is not None:
            rows = 0 if self.feature_data is None else len(self.feature_data)
            return (np.asarray(payload, np.float64),
                    "by their effect on the output: std x mean |d output / d feature| over "
                    f"{min(rows, SENSITIVITY_SAMPLE)} rows of feature_data, "
                    "summed over the output units", "effect")
        if self.units == 1:
            return feature_weights(kernel), "by |weight|", "weight"
        return (feature_weights(kernel),
                f"by the L2 norm of the feature's row over {self.units} units; not its effect "
                "on the output", "L2 norm over units")

    def stats(self, stats: Stats, payload: Any) -> Stats:
        """With the effect ranking: each feature's effect, stored with the kernel's statistics
        (for `diff`), when the layer has at most `max_feature_scalars` input features."""
        if payload is None or self.key is None or len(self.names) > self.max_feature_scalars:
            return {}
        from ..features import effect_stats

        return {self.key: effect_stats(payload)}

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        from ..features import markdown_table, top_k_features
        from ..summaries import scalar, tag, text

        if self.feature_data is not None and self._data is None:
            from ..features import FeatureData

            self._data = FeatureData.from_sample(self.feature_data)
        if self.key is None:
            raise ValueError("FeatureView: `prepare` has not run")
        kernel = snapshot.arrays[self.key]
        weights, ranked, column = self._ranked(kernel, payload)  # the table and the scalars
        rows = top_k_features(kernel, self.names, self.top_k, self._data, weights=weights)
        if payload is not None:  # the effect already carries the feature's std
            rows = [dataclasses.replace(r, standardized=None) for r in rows]
        when = {"initial": "initial weights", "batch": f"during epoch {snapshot.epoch}"}.get(
            snapshot.label, f"epoch {snapshot.epoch}")
        title = (
            f"Top {len(rows)} of {len(self.names)} input features of `{self.layer_name}` "
            f"{ranked} ({when}, step {snapshot.step})"
        )
        table = markdown_table(rows, self.units, title, column)
        values = [text(tag("features", self.layer_name), table)]
        if len(self.names) <= self.max_feature_scalars:
            values += [scalar(t, w) for t, w in zip(self._feature_tags(), weights.tolist())]
        else:
            tags = self._feature_tags()
            values += [scalar(tags[r.index], r.weight) for r in rows]
        events.write(snapshot.step, values, wall_time=snapshot.time)
