"""`ResponseView`: sample images and their responses to the kernels of Conv2D layers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from typing import Any, NamedTuple

import numpy as np

from ..capture import ModelInfo, Snapshot
from ..errors import received
from ..naming import model_group
from ..settings import Settings
from .base import (
    PngFiles,
    Stats,
    View,
    find_layer,
    keras_module,
    model_inputs,
    variable_key,
    weight_keys,
)


class _Target(NamedTuple):
    """One Conv2D layer whose responses are drawn, with what computing them needs."""

    layer: str
    key: str
    """The run's key of the layer's kernel."""
    channels_first: bool
    padding: str
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    fed_by_input: bool
    """Whether the model input feeds the layer directly (no sub-model needed in kernel mode)."""
    input_size: tuple[int, int] | None
    """The layer input's static `(H, W)`, where known."""


def _shape(x: np.ndarray) -> str:
    return f"Received: sample_images with shape {x.shape}"


def _layer_input(layer: Any) -> Any:
    """The layer's one symbolic input, or None (a shared layer, a subclassed model's layer)."""
    try:
        return layer.input
    except (AttributeError, ValueError):
        return None


def _spatial_size(tensor: Any, channels_first: bool) -> tuple[int, int] | None:
    """A 4-D tensor's `(H, W)`, or None where not both are known."""
    shape = tuple(getattr(tensor, "shape", ()) or ())
    if len(shape) != 4:
        return None
    h, w = shape[2:4] if channels_first else shape[1:3]
    return None if h is None or w is None else (int(h), int(w))


def _geometry(t: _Target, kernel_shape: tuple[int, ...], input_size: Any) -> Any:
    """Where `t`'s output pixels sit on its input (`responses.Geometry`)."""
    from ..responses import Geometry

    return Geometry((int(kernel_shape[0]), int(kernel_shape[1])), (t.strides[0], t.strides[1]),
                    t.padding, (t.dilation[0], t.dilation[1]), input_size)


class ResponseView(View):
    """Sample images and their responses to each kernel of Conv2D layers.

    In `"kernel"` mode a response is the cross-correlation of the layer's
    input with one kernel (see `responses.correlate`: the layer's padding,
    strides and dilation, no bias, no activation), computed on the worker
    from the snapshot's kernel; for a layer that is not fed by the model input
    directly, its input is computed at each snapshot by a sub-model. In
    `"activation"` mode it is the layer's output, computed by a sub-model.
    Each response is drawn at the sample image's size (nearest neighbour
    around each output's receptive-field centre, so a strided layer's map
    lies over the pixels it came from) and on its own scale around its own
    mean (`images.response_grid`; the tag's description states the scales).

    Args:
        sample_images: `(N, H, W, C)` (or `(N, C, H, W)` for a channels_first
            model), in the model's input layout.
        mode: `"kernel"` or `"activation"`. Defaults to `"kernel"`.
        layers: Names of Conv2D layers. Defaults to None: the first one.
        max_tiles: The most response tiles per image. Defaults to 256.
        out_dir: Also write the grids as PNG files here
            (`<layer>/sample_<i>/step_<step>.png`): a directory or any fsspec URL.
            Defaults to None.
        storage_options: fsspec options for an `out_dir` URL. Defaults to None.

    Tags: `<model>/1_responses/<layer>/sample_<i>` (`summaries.response_tag`).
    """

    name = "responses"

    def __init__(
        self,
        sample_images: np.ndarray,
        mode: str = Settings.response_mode,
        layers: Sequence[str] | None = Settings.response_layers,
        max_tiles: int = Settings.max_kernel_tiles,
        out_dir: str | None = Settings.responses_dir,
        storage_options: Mapping[str, Any] | None = None,
    ):
        self.sample_images = sample_images
        self.mode = mode
        self.layer_names = None if layers is None else list(layers)
        self.max_tiles = max_tiles
        self.out_dir = out_dir
        self._pngs = None if out_dir is None else PngFiles(out_dir, storage_options)
        self.targets: list[_Target] = []
        self._submodels: dict[str, Any] = {}
        self._images_nhwc: np.ndarray | None = None
        self._model_images: np.ndarray | None = None
        self._group = ""

    # ------------------------------------------------------------ train begin

    def _chosen_layers(self, model: Any) -> list[Any]:
        """The Conv2D layers to draw: those named, or the first one at the top level."""
        conv2d = keras_module().layers.Conv2D
        top = list(getattr(model, "layers", []))
        if self.layer_names is None:
            chosen = [layer for layer in top if isinstance(layer, conv2d)][:1]
            if not chosen:
                kinds = sorted({type(layer).__name__ for layer in top} - {"InputLayer"})
                raise ValueError(
                    "`sample_images` needs a Conv2D layer to filter them by, at the model's top "
                    f"level; this model has none (its layers are {kinds}). "
                    f"{_shape(self.sample_images)}"
                )
            return chosen
        chosen = []
        for name in self.layer_names:
            layer = find_layer(model, name, "response_layers")
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
        return chosen

    def _target(self, layer: Any, inputs: Sequence[Any], keys: Mapping[int, str]) -> _Target:
        if self.mode == "kernel" and layer.padding not in ("valid", "same"):
            raise ValueError(
                f"`response_layers`: {layer.name!r} has padding={layer.padding!r}; kernel "
                "responses support 'valid' and 'same'."
            )
        layer_input = _layer_input(layer)
        return _Target(
            layer=layer.name,
            key=str(variable_key(layer, "kernel", keys)),
            channels_first=layer.data_format == "channels_first",
            padding=layer.padding,
            strides=tuple(layer.strides),
            dilation=tuple(layer.dilation_rate),
            fed_by_input=layer_input is not None and any(layer_input is t for t in inputs),
            input_size=_spatial_size(layer_input, layer.data_format == "channels_first"),
        )

    def _model_input(self, inputs: Sequence[Any], target: _Target) -> Any:
        """The model's one input, which a sub-model needs to compute what `target` draws."""
        if len(inputs) == 1:
            return inputs[0]
        has = (
            f"this model has {len(inputs)} ({[getattr(t, 'name', '?') for t in inputs]})"
            if inputs
            else "this model has no known input (a subclassed model)"
        )
        if self.mode == "activation":
            raise ValueError(
                f"`response_mode='activation'` computes the output of {target.layer!r} by "
                f"running the model on the sample images, which needs a model with exactly one "
                f"input; {has}. `response_mode='kernel'` needs only the kernel, for a Conv2D "
                "layer fed directly by a model input. Received: response_mode='activation'"
            )
        raise ValueError(
            f"`sample_images`: {target.layer!r} is not fed directly by a model input, so its "
            "input is computed by running the model on the sample images, which needs a model "
            f"with exactly one input; {has}. Name a Conv2D layer fed directly by an input in "
            f"`response_layers`. {received('response_layers', self.layer_names)}"
        )

    def _check_shape(self, tensor: Any, where: str) -> None:
        """The sample images must fit the input `tensor` (`where` names it in the message)."""
        x = self.sample_images
        expected = tuple(tensor.shape)
        if len(expected) != 4 or any(
            e is not None and int(e) != int(g) for e, g in zip(expected[1:], x.shape[1:])
        ):
            raise ValueError(f"`sample_images` must match {where} {expected}. {_shape(x)}")

    def prepare(self, model: Any, info: ModelInfo) -> None:
        x = self.sample_images
        self._group = model_group(info.name, info.class_name)
        chosen = self._chosen_layers(model)
        inputs = model_inputs(model)
        keys = weight_keys(model, info)
        self.targets = [self._target(layer, inputs, keys) for layer in chosen]
        keras = keras_module()
        self._submodels = {}
        self._model_images = None
        for layer, target in zip(chosen, self.targets):
            if self.mode == "kernel" and target.fed_by_input:
                # Only the layer's own input matters: any input of a multi-input model will do.
                where = "the model input shape" if len(inputs) == 1 else (
                    f"the input shape of {target.layer!r} (model input {layer.input.name!r})")
                self._check_shape(layer.input, where)
                continue
            model_input = self._model_input(inputs, target)
            self._check_shape(model_input, "the model input shape")
            dtype = str(getattr(model_input, "dtype", None) or "float32")
            self._model_images = np.asarray(x, dtype=dtype)
            out = layer.output if self.mode == "activation" else layer.input
            self._submodels[layer.name] = keras.Model(model_input, out)
        channels_first = chosen[0].data_format == "channels_first"
        self._images_nhwc = np.moveaxis(x, 1, -1) if channels_first else x

    def restrict(self, keys: Set[str]) -> None:
        kept = [t for t in self.targets if t.key in keys]
        if not kept:
            names = [t.key for t in self.targets]
            raise ValueError(
                f"the responses to `sample_images` need the kernels {names}, which "
                "`include`/`exclude` leave out; include them or drop `sample_images`. "
                f"Received: response kernels={names}"
            )
        self.targets = kept
        names_kept = {t.layer for t in kept}
        self._submodels = {n: m for n, m in self._submodels.items() if n in names_kept}

    # ------------------------------------------------------------ each snapshot

    def _images(self) -> np.ndarray:
        """The sample images, channels last (set by `prepare`)."""
        if self._images_nhwc is None:
            raise ValueError("ResponseView: `prepare` has not run")
        return self._images_nhwc

    def capture(self, model: Any) -> dict[str, np.ndarray] | None:
        if not self._submodels:
            return None
        keras = keras_module()
        out = {}
        for name, sub in self._submodels.items():
            y = sub(self._model_images, training=False)
            out[name] = np.asarray(keras.ops.convert_to_numpy(y))
        return out

    def responses(
        self, snapshot: Snapshot, payload: Mapping[str, np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        """Layer name -> responses `(N, h, w, outputs)` (channels last) for one snapshot."""
        from ..responses import correlate

        out = {}
        for t in self.targets:
            if self.mode == "activation" or not t.fed_by_input:
                if payload is None or t.layer not in payload:
                    continue
                arr = payload[t.layer]
                if t.channels_first:
                    arr = np.moveaxis(arr, 1, -1)
                if self.mode == "activation":
                    out[t.layer] = arr
                    continue
                layer_in = arr
            else:
                layer_in = self._images()
            out[t.layer] = correlate(
                layer_in, snapshot.arrays[t.key], t.strides, t.padding, t.dilation
            )
        return out

    def _layer_geometry(self, t: _Target, snapshot: Snapshot, payload: Any) -> Any:
        """`t`'s geometry on the sample images: None where its input size is unknown (then
        its maps are only stretched to the images' size)."""
        shape = snapshot.arrays[t.key].shape
        if t.fed_by_input:
            return _geometry(t, shape, None)
        if self.mode == "kernel" and payload is not None and t.layer in payload:
            return _geometry(t, shape, _spatial_size(payload[t.layer], t.channels_first))
        return None if t.input_size is None else _geometry(t, shape, t.input_size)

    def _description(self, i: int, name: str, res: np.ndarray, grid: Any, geometry: Any) -> str:
        size = "x".join(str(n) for n in self._images().shape[1:3])
        lo, hi = (min(grid.scales), max(grid.scales)) if grid.scales else (0.0, 0.0)
        how = (
            "stretched by nearest neighbour" if geometry is None else
            f"stride {geometry.strides[0]}x{geometry.strides[1]}, upsampled by nearest "
            "neighbour around each output's receptive-field centre"
        )
        return (
            f"Sample {i} and its {self.mode} response to each of the {res.shape[-1]} kernels "
            f"of `{name}` ({len(grid.tiles) - 1} shown). Each tile is drawn at the image's "
            f"{size} pixels (the {res.shape[1]}x{res.shape[2]} output, {how}) and on its own "
            "scale: white is the tile's mean, full red (blue) its mean plus (minus) its "
            f"largest |r - mean|, which ranges from {lo:.4g} to {hi:.4g} across tiles; "
            "mid-grey: no output covers the pixel ('valid' border); green: NaN/Inf"
        )

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        from ..images import encode_png, response_grid
        from ..summaries import image

        images = self._images()
        values = []
        for name, res in self.responses(snapshot, payload).items():
            target = next(t for t in self.targets if t.layer == name)
            geometry = self._layer_geometry(target, snapshot, payload)
            for i in range(res.shape[0]):
                grid = response_grid(images[i], res[i], self.max_tiles, geometry)
                png = encode_png(grid.image)
                h, w = grid.image.shape[:2]
                desc = self._description(i, name, res, grid, geometry)
                values.append(image(self.tag(name, i), [png], w, h, desc))
                if self._pngs is not None:
                    self._pngs.write(f"{name}/sample_{i}/step_{snapshot.step}.png", png)
        events.write(snapshot.step, values, wall_time=snapshot.time)

    def tag(self, layer: str, sample: int) -> str:
        """The image tag of `layer`'s responses of sample `sample` (set by `prepare`)."""
        from ..summaries import response_tag

        return response_tag(self._group, layer, sample)

    def close(self) -> None:
        self._submodels = {}
