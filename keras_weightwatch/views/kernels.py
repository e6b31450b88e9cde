"""`KernelImageView`: the kernels of every convolution layer as image grids."""

from __future__ import annotations

from collections.abc import Set
from typing import Any, NamedTuple

from ..capture import ModelInfo, Snapshot
from ..naming import CONV_KINDS, model_group
from ..settings import Settings
from .base import Stats, View, all_layers, keras_module, variable_key, weight_keys


class _ConvClass(NamedTuple):
    cls: type
    kernel: str
    """The attribute of the kernel that is drawn."""
    rgb: bool


class _Kernel(NamedTuple):
    key: str
    rgb: bool
    """Whether a kernel with 3 input channels may be drawn as colour images."""
    class_name: str
    tag: str
    """Its image tag (`summaries.kernel_tag`: numbered by its place among all the model's
    convolution kernels, so it does not change with `include`/`exclude`)."""


def _conv_classes() -> list[_ConvClass]:
    """`naming.CONV_KINDS` resolved to the Keras classes this Keras has (aliases once)."""
    layers = keras_module().layers
    out: list[_ConvClass] = []
    for kind in CONV_KINDS.values():
        cls = getattr(layers, kind.class_name, None)
        if isinstance(cls, type) and all(c.cls is not cls for c in out):
            out.append(_ConvClass(cls, kind.kernel, kind.rgb))
    return out


class KernelImageView(View):
    """All kernels of every convolution layer as one grid image per layer.

    See `images.kernel_grid`: symmetric diverging colours per layer, RGB tiles
    for regular and transposed convolutions with exactly 3 input (transposed:
    output) channels, one tile per (input, output) pair otherwise, at most
    `max_tiles` tiles. Separable convolutions show their depthwise kernel.
    Tags: `<model>/2_kernels/<n>_<weight key>/image` (`summaries.kernel_tag`).

    Args:
        max_tiles: The most tiles one grid holds. Defaults to 256.
    """

    name = "kernel_images"

    def __init__(self, max_tiles: int = Settings.max_kernel_tiles):
        self.max_tiles = max_tiles
        self.kernels: list[_Kernel] = []

    def prepare(self, model: Any, info: ModelInfo) -> None:
        from ..summaries import kernel_tag

        keys = weight_keys(model, info)
        classes = _conv_classes()
        found: list[tuple[str, bool, str]] = []
        for layer in all_layers(model):
            for conv in classes:
                if isinstance(layer, conv.cls):
                    key = variable_key(layer, conv.kernel, keys)
                    if key is not None:
                        found.append((key, conv.rgb, type(layer).__name__))
                    break
        group = model_group(info.name, info.class_name)
        self.kernels = [_Kernel(key, rgb, cls, kernel_tag(group, key, i, len(found)))
                        for i, (key, rgb, cls) in enumerate(found)]

    def restrict(self, keys: Set[str]) -> None:
        self.kernels = [k for k in self.kernels if k.key in keys]

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        from ..images import encode_png, kernel_grid
        from ..summaries import image

        values = []
        for key, rgb_ok, cls, name in self.kernels:
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
            values.append(image(name, [encode_png(grid.image)], w, h, desc))
        events.write(snapshot.step, values, wall_time=snapshot.time)
