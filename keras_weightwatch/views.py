"""The TensorBoard views that WeightWatch writes at each snapshot.

A view has three hooks:

- `prepare(model, info)` runs on the training thread at train begin. It checks
  the view's arguments against the model (a feature layer that does not exist,
  sample images of the wrong shape) and raises `ValueError`/`TypeError` before
  any epoch runs.
- `capture(model)` runs on the training thread at each snapshot, for the rare
  view that needs Keras to compute something (a layer's activations). It
  returns a payload of numpy arrays, or None.
- `write(snapshot, stats, payload, events)` runs on the background worker with
  numpy arrays only, and writes summaries through `events`.

`build_views(settings)` turns the callback's settings into the list of views.

Tags (all made by `summaries.tag`, so they are stable across runs):

| view | plugin | tag |
|---|---|---|
| `StatsView` | scalars | `<weight key>/<statistic>` (`dense/kernel/l2_norm`) |
| `HistogramView` | histograms | `<weight key>/histogram` |
| `FeatureView` | text | `features/<layer>` |
| `FeatureView` | scalars | `features/<layer>/<feature name>` (see `MAX_FEATURE_SCALARS`) |
| `KernelImageView` | images | `<weight key>/image` (`conv2d/kernel/image`) |
| `ResponseView` | images | `responses/<layer>/sample_<i>` |
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .capture import ModelInfo, Snapshot
from .errors import received
from .stats import STAT_NAMES

# A feature layer with at most this many input features gets one scalar per feature at every
# snapshot; a wider one (a Dense layer after a Flatten) gets scalars only for the features in
# the snapshot's top-k table.
MAX_FEATURE_SCALARS = 100


class View:
    """Base class of a view; see the module docstring."""

    name = "view"

    def prepare(self, model: Any, info: ModelInfo) -> None:
        """Check arguments against the model (training thread, train begin)."""

    def capture(self, model: Any) -> Any:
        """Compute a payload that needs Keras (training thread, each snapshot)."""
        return None

    def write(
        self,
        snapshot: Snapshot,
        stats: Mapping[str, Mapping[str, float]],
        payload: Any,
        events: Any,
    ) -> None:
        """Write this view's summaries for one snapshot (worker thread)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release whatever the view holds (train end)."""


# ---------------------------------------------------------------- model helpers (training thread)


def _all_layers(model: Any) -> list[Any]:
    """Every layer of the model, nested ones included, in model order."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    return list(getattr(model, "layers", []))


def _weight_keys(model: Any, info: ModelInfo) -> dict[int, str]:
    """id(variable) -> the run's key for it."""
    return {id(v): spec.key for v, spec in zip(model.weights, info.weights)}


def _find_layer(model: Any, name: str, arg: str) -> Any:
    for layer in _all_layers(model):
        if layer.name == name:
            return layer
    names = [layer.name for layer in _all_layers(model)]
    raise ValueError(
        f"`{arg}`: the model has no layer named {name!r} (it has {names}). {received(arg, name)}"
    )


def _keras() -> Any:
    import keras

    return keras


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


def _input_fed_dense(model: Any) -> Any | None:
    """The first Dense layer fed by a model input, possibly through feature-preserving layers."""
    keras = _keras()
    try:
        inputs = {id(t) for t in model.inputs}
    except (AttributeError, ValueError):
        return None
    for layer in _all_layers(model):
        if not isinstance(layer, keras.layers.Dense):
            continue
        try:
            t = layer.input
        except (AttributeError, ValueError):
            continue
        for _ in range(100):
            if id(t) in inputs:
                return layer
            hist = getattr(t, "_keras_history", None)
            op = None if hist is None else hist[0]
            if op is None or type(op).__name__ not in _FEATURE_PRESERVING:
                break
            try:
                t = op.input
            except (AttributeError, ValueError):
                break
            if isinstance(t, (list, tuple)):
                break
    return None


# ---------------------------------------------------------------- statistics and histograms


class StatsView(View):
    """Scalars of every weight: `l2_norm`, `mean`, `std`, `max_abs`, NaN/Inf counts, `update_ratio`.

    `update_ratio` (||W_t - W_prev|| / ||W_prev||) is absent at a run's first
    snapshot, which has no previous one.
    """

    name = "stats"

    def write(self, snapshot, stats, payload, events) -> None:
        from .summaries import scalar, tag

        values = []
        for key, st in stats.items():
            for stat in STAT_NAMES:
                if stat in st:
                    values.append(scalar(tag(key, stat), st[stat]))
        events.write(snapshot.step, values, wall_time=snapshot.time)


class HistogramView(View):
    """A fixed-bin histogram of the finite values of every weight tensor."""

    name = "histograms"

    def write(self, snapshot, stats, payload, events) -> None:
        from .histograms import histogram as bins
        from .summaries import histogram, tag

        values = [
            histogram(tag(key, "histogram"), bins(arr)) for key, arr in snapshot.arrays.items()
        ]
        events.write(snapshot.step, values, wall_time=snapshot.time)


# ---------------------------------------------------------------- top-k features


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
        feature_names: Sequence[str] | None = None,
        top_k: int = 5,
        feature_layer: str | None = None,
        feature_data: np.ndarray | None = None,
        max_feature_scalars: int = MAX_FEATURE_SCALARS,
    ):
        self.feature_names = None if feature_names is None else list(feature_names)
        self.max_feature_scalars = max_feature_scalars
        self.top_k = top_k
        self.feature_layer = feature_layer
        self.feature_data = feature_data
        self.layer_name: str | None = None
        self.key: str | None = None
        self.units = 1
        self.names: list[str] = []
        self.tags: list[str] = []
        self._data: Any = None  # FeatureData of feature_data, made at the first write

    def prepare(self, model, info) -> None:

        keras = _keras()
        if self.feature_layer is not None:
            layer = _find_layer(model, self.feature_layer, "feature_layer")
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
        n_in, units = (int(s) for s in layer.kernel.shape)
        names = self.feature_names
        if names is None:
            names = [f"feature_{i}" for i in range(n_in)]
        elif len(names) != n_in:
            raise ValueError(
                f"`feature_names` has {len(names)} names but layer {layer.name!r} has {n_in} input "
                f"features. {received('feature_names', self.feature_names)}"
            )
        if self.feature_data is not None:
            data = self.feature_data
            if data.dtype.kind not in "biuf":
                raise TypeError(
                    "`feature_data` must be numeric. "
                    f"Received: feature_data with dtype {data.dtype}"
                )
            if data.ndim != 2 or data.shape[1] != n_in:
                raise ValueError(
                    f"`feature_data` must have shape (samples, {n_in}) for layer {layer.name!r}. "
                    f"Received: feature_data with shape {data.shape}"
                )
            if data.shape[0] < 2:
                raise ValueError(
                    "`feature_data` needs at least 2 samples. "
                    f"Received: feature_data with shape {data.shape}"
                )
        # Its statistics are made once per fit by the worker, at the first write (the
        # correlations of many features take a while): not on the training thread.
        self._data = None
        keys = _weight_keys(model, info)
        self.key = keys[id(layer.kernel)]
        self.layer_name = self.key.rsplit("/", 1)[0] if "/" in self.key else layer.name
        self.units = units
        self.names = list(names)
        self.tags = []  # made by the worker at the first write: thousands of names take a while

    def _feature_tags(self) -> list[str]:
        """One scalar tag per feature, unique (a name that cleans to a tag already taken
        gets its index appended)."""
        if len(self.tags) != len(self.names):
            from .summaries import tag

            table = tag("features", self.layer_name)
            tags, seen = [], set()
            for i, n in enumerate(self.names):
                t = tag(table, n)
                if t in seen or t == table:
                    t = f"{t}_{i}"
                seen.add(t)
                tags.append(t)
            self.tags = tags
        return self.tags

    def write(self, snapshot, stats, payload, events) -> None:
        from .features import feature_weights, markdown_table, top_k_features
        from .summaries import scalar, tag, text

        if self.feature_data is not None and self._data is None:
            from .features import FeatureData

            self._data = FeatureData.from_sample(self.feature_data)
        kernel = snapshot.arrays[self.key]
        weights = feature_weights(kernel)  # once per snapshot: the table and the scalars
        rows = top_k_features(kernel, self.names, self.top_k, self._data, weights=weights)
        when = "initial weights" if snapshot.label == "initial" else f"epoch {snapshot.epoch}"
        title = (
            f"Top {len(rows)} of {len(self.names)} input features of `{self.layer_name}` "
            f"by |weight| ({when}, step {snapshot.step})"
        )
        values = [text(tag("features", self.layer_name), markdown_table(rows, self.units, title))]
        if len(self.names) <= self.max_feature_scalars:
            values += [scalar(t, w) for t, w in zip(self._feature_tags(), weights.tolist())]
        else:
            tags = self._feature_tags()
            values += [scalar(tags[r.index], r.weight) for r in rows]
        events.write(snapshot.step, values, wall_time=snapshot.time)


# ---------------------------------------------------------------- kernel images


def _conv_kinds() -> list[tuple[type, str, bool]]:
    """(class, kernel attribute, may be drawn as RGB) for every Keras convolution layer."""
    layers = _keras().layers
    out = []
    for name in (
        "Conv1D",
        "Conv2D",
        "Conv3D",
        "Conv1DTranspose",
        "Conv2DTranspose",
        "Conv3DTranspose",
    ):
        if hasattr(layers, name):
            out.append((getattr(layers, name), "kernel", True))
    for name in ("DepthwiseConv1D", "DepthwiseConv2D"):
        if hasattr(layers, name):
            out.append((getattr(layers, name), "kernel", False))
    for name in ("SeparableConv1D", "SeparableConv2D"):
        if hasattr(layers, name):
            out.append((getattr(layers, name), "depthwise_kernel", False))
    return out


class KernelImageView(View):
    """All kernels of every convolution layer as one grid image per layer.

    See `images.kernel_grid`: symmetric diverging colours per layer, RGB tiles
    for regular and transposed convolutions with exactly 3 input (transposed:
    output) channels, one tile per (input, output) pair otherwise, at most
    `max_tiles` tiles. Separable convolutions show their depthwise kernel.

    Args:
        max_tiles: The most tiles one grid holds. Defaults to 256.
    """

    name = "kernel_images"

    def __init__(self, max_tiles: int = 256):
        self.max_tiles = max_tiles
        self.kernels: list[tuple[str, bool, str]] = []  # (key, rgb allowed, layer class)

    def prepare(self, model, info) -> None:
        keys = _weight_keys(model, info)
        kinds = _conv_kinds()
        self.kernels = []
        for layer in _all_layers(model):
            for cls, attr, rgb in kinds:
                if isinstance(layer, cls):
                    var = getattr(layer, attr, None)
                    if var is not None and id(var) in keys:
                        self.kernels.append((keys[id(var)], rgb, type(layer).__name__))
                    break

    def write(self, snapshot, stats, payload, events) -> None:
        from .images import encode_png, kernel_grid
        from .summaries import image, tag

        values = []
        for key, rgb_ok, cls in self.kernels:
            k = snapshot.arrays[key]
            grid = kernel_grid(
                k, self.max_tiles, rgb=None if rgb_ok and k.shape[-2] == 3 else False
            )
            h, w = grid.image.shape[:2]
            desc = (
                f"{cls} `{key}` {tuple(k.shape)}: {len(grid.tiles)} of {grid.total} tiles"
                + (" (RGB: one tile per filter)" if grid.rgb else " (one per input x output)")
                + f", {grid.scale} px per weight; blue < 0 < red, |w| = {grid.vmax:.4g} at full "
                "colour; green marks NaN/Inf"
            )
            values.append(image(tag(key, "image"), [encode_png(grid.image)], w, h, desc))
        events.write(snapshot.step, values, wall_time=snapshot.time)


# ---------------------------------------------------------------- filtered-image responses


class ResponseView(View):
    """Sample images and their responses to each kernel of Conv2D layers.

    In `"kernel"` mode a response is the cross-correlation of the layer's
    input with one kernel (see `responses.correlate`: the layer's padding,
    strides and dilation, no bias, no activation), computed on the worker
    from the snapshot's kernel; for a layer that is not fed by the model input
    directly, its input is computed at each snapshot by a sub-model. In
    `"activation"` mode it is the layer's output, computed by a sub-model.

    Args:
        sample_images: `(N, H, W, C)` (or `(N, C, H, W)` for a channels_first
            model), in the model's input layout.
        mode: `"kernel"` or `"activation"`. Defaults to `"kernel"`.
        layers: Names of Conv2D layers. Defaults to None: the first one.
        max_tiles: The most response tiles per image. Defaults to 256.
        out_dir: Also write the grids as PNG files here
            (`<layer>/sample_<i>/step_<step>.png`). Defaults to None.
    """

    name = "responses"

    def __init__(
        self,
        sample_images: np.ndarray,
        mode: str = "kernel",
        layers: Sequence[str] | None = None,
        max_tiles: int = 256,
        out_dir: str | None = None,
    ):
        self.sample_images = sample_images
        self.mode = mode
        self.layer_names = None if layers is None else list(layers)
        self.max_tiles = max_tiles
        self.out_dir = out_dir
        # (layer name, kernel key, channels_first, padding, strides, dilation, needs sub-model)
        self.targets: list[dict[str, Any]] = []
        self._submodels: dict[str, Any] = {}
        self._images_nhwc: np.ndarray | None = None
        self._model_images: np.ndarray | None = None

    def prepare(self, model, info) -> None:
        keras = _keras()
        x = self.sample_images
        if x.dtype.kind not in "biuf":
            raise TypeError(
                "`sample_images` must be numeric images. "
                f"Received: sample_images with dtype {x.dtype}"
            )
        if x.ndim != 4:
            raise ValueError(
                "`sample_images` must be a 4-D batch (N, H, W, C) in the model's input layout. "
                f"Received: sample_images with shape {x.shape}"
            )
        if x.shape[0] < 1:
            raise ValueError(
                f"`sample_images` is empty. Received: sample_images with shape {x.shape}"
            )
        try:
            inputs = list(model.inputs)
        except (AttributeError, ValueError):
            inputs = []
        if len(inputs) != 1:
            raise ValueError(
                "`sample_images` needs a model with exactly one (known) input; this model has "
                f"{len(inputs)}. Received: sample_images with shape {x.shape}"
            )
        expected = tuple(inputs[0].shape)
        if len(expected) != 4 or any(
            e is not None and int(e) != int(g) for e, g in zip(expected[1:], x.shape[1:])
        ):
            raise ValueError(
                f"`sample_images` must match the model input shape {expected}. "
                f"Received: sample_images with shape {x.shape}"
            )
        conv2d = keras.layers.Conv2D
        top = list(getattr(model, "layers", []))
        if self.layer_names is None:
            chosen = [layer for layer in top if isinstance(layer, conv2d)][:1]
            if not chosen:
                raise ValueError(
                    "`sample_images` needs a Conv2D layer in the model (at its top level) or "
                    f"`response_layers=`. Received: sample_images with shape {x.shape}"
                )
        else:
            chosen = []
            for name in self.layer_names:
                layer = _find_layer(model, name, "response_layers")
                if not any(layer is t for t in top):
                    raise ValueError(
                        f"`response_layers`: {name!r} is inside a nested model; name a layer at "
                        f"the model's top level. {received('response_layers', self.layer_names)}"
                    )
                if not isinstance(layer, conv2d) or getattr(layer, "groups", 1) != 1:
                    raise ValueError(
                        f"`response_layers` must name Conv2D layers (groups=1); {name!r} is a "
                        f"{type(layer).__name__}. {received('response_layers', self.layer_names)}"
                    )
                chosen.append(layer)
        keys = _weight_keys(model, info)
        channels_first = chosen[0].data_format == "channels_first"
        self._images_nhwc = np.moveaxis(x, 1, -1) if channels_first else x
        self._model_images = np.asarray(
            x, dtype=str(getattr(inputs[0], "dtype", None) or "float32")
        )
        self.targets = []
        self._submodels = {}
        for layer in chosen:
            fed_by_input = layer.input is inputs[0]
            target = {
                "layer": layer.name,
                "key": keys[id(layer.kernel)],
                "channels_first": layer.data_format == "channels_first",
                "padding": layer.padding,
                "strides": tuple(layer.strides),
                "dilation": tuple(layer.dilation_rate),
                "fed_by_input": fed_by_input,
            }
            self.targets.append(target)
            if self.mode == "activation":
                self._submodels[layer.name] = keras.Model(inputs[0], layer.output)
            elif not fed_by_input:
                self._submodels[layer.name] = keras.Model(inputs[0], layer.input)
            if self.mode == "kernel" and layer.padding not in ("valid", "same"):
                raise ValueError(
                    f"`response_layers`: {layer.name!r} has padding={layer.padding!r}; kernel "
                    "responses support 'valid' and 'same'."
                )

    def capture(self, model) -> dict[str, np.ndarray] | None:
        if not self._submodels:
            return None
        keras = _keras()
        out = {}
        for name, sub in self._submodels.items():
            y = sub(self._model_images, training=False)
            out[name] = np.asarray(keras.ops.convert_to_numpy(y))
        return out

    def responses(
        self, snapshot: Snapshot, payload: Mapping[str, np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        """Layer name -> responses `(N, h, w, outputs)` (channels last) for one snapshot."""
        from .responses import correlate

        out = {}
        for t in self.targets:
            name = t["layer"]
            if self.mode == "activation" or not t["fed_by_input"]:
                if payload is None or name not in payload:
                    continue
                arr = payload[name]
                if t["channels_first"]:
                    arr = np.moveaxis(arr, 1, -1)
                if self.mode == "activation":
                    out[name] = arr
                    continue
                layer_in = arr
            else:
                layer_in = self._images_nhwc
            out[name] = correlate(
                layer_in, snapshot.arrays[t["key"]], t["strides"], t["padding"], t["dilation"]
            )
        return out

    def write(self, snapshot, stats, payload, events) -> None:
        from .images import encode_png, response_grid
        from .summaries import image, tag

        values = []
        for name, res in self.responses(snapshot, payload).items():
            for i in range(res.shape[0]):
                grid = response_grid(self._images_nhwc[i], res[i], self.max_tiles)
                png = encode_png(grid.image)
                h, w = grid.image.shape[:2]
                desc = (
                    f"Sample {i} and its {self.mode} response to each of the {res.shape[-1]} "
                    f"kernels of `{name}` ({len(grid.tiles) - 1} shown); blue < 0 < red, "
                    f"|r| = {grid.vmax:.4g} at full colour"
                )
                values.append(image(tag("responses", name, f"sample_{i}"), [png], w, h, desc))
                if self.out_dir is not None:
                    d = os.path.join(self.out_dir, name, f"sample_{i}")
                    os.makedirs(d, exist_ok=True)
                    path = os.path.join(d, f"step_{snapshot.step}.png")
                    tmp = path + ".tmp"
                    with open(tmp, "wb") as f:
                        f.write(png)
                    os.replace(tmp, path)
        events.write(snapshot.step, values, wall_time=snapshot.time)

    def close(self) -> None:
        self._submodels = {}


# ---------------------------------------------------------------- settings -> views


def build_views(settings: Mapping[str, Any]) -> list[View]:
    """The views the callback's settings ask for, in writing order.

    Args:
        settings: `WeightWatch.get_config()` with `feature_data` and
            `sample_images` as arrays (or None).

    Returns:
        Statistics always; histograms, the feature table, kernel images and
        responses when the settings ask for them.
    """
    views: list[View] = [StatsView()]
    if settings.get("histograms", True):
        views.append(HistogramView())
    feature_data = settings.get("feature_data")
    if (
        settings.get("feature_names") is not None
        or settings.get("feature_layer") is not None
        or feature_data is not None
    ):
        views.append(
            FeatureView(
                settings.get("feature_names"),
                int(settings.get("top_k", 5)),
                settings.get("feature_layer"),
                None if feature_data is None else np.asarray(feature_data),
            )
        )
    max_tiles = int(settings.get("max_kernel_tiles", 256))
    if settings.get("kernel_images", True):
        views.append(KernelImageView(max_tiles))
    sample_images = settings.get("sample_images")
    if sample_images is not None:
        views.append(
            ResponseView(
                np.asarray(sample_images),
                settings.get("response_mode", "kernel"),
                settings.get("response_layers"),
                max_tiles,
                settings.get("responses_dir"),
            )
        )
    elif settings.get("response_layers") is not None or settings.get("responses_dir") is not None:
        raise ValueError(
            "`response_layers` and `responses_dir` need `sample_images`. "
            "Received: sample_images=None"
        )
    return views
