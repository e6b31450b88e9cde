"""`SaliencyView`: where the model looks in each sample image, drawn beside the image."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..capture import ModelInfo, Snapshot
from ..errors import received
from ..naming import model_group
from ..settings import Settings
from .base import PngFiles, Stats, View, find_layer, model_inputs

CAM_METHODS = ("gradcam", "hirescam")

_WHAT = {
    "vanilla": "|d score / d pixel| (largest over channels)",
    "smoothgrad": "SmoothGrad: |d score / d pixel| averaged over noisy copies",
    "gradcam": "Grad-CAM on `{layer}` (ReLU of the channels weighted by their mean gradient)",
    "hirescam": "HiResCAM on `{layer}` (ReLU of activations x gradients, position by position)",
}


def saliency_maps(model: Any, images: np.ndarray, method: str, class_index: int | None,
                  layer: str | None) -> Any:
    """The `saliency.Saliency` of one method (the one call per method a snapshot makes)."""
    from .. import saliency

    if method == "vanilla":
        return saliency.vanilla(model, images, class_index)
    if method == "smoothgrad":
        return saliency.smoothgrad(model, images, class_index)
    if method == "gradcam":
        return saliency.gradcam(model, images, layer, class_index)
    return saliency.hirescam(model, images, layer, class_index)


def caption(method: str, index: int, cls: int, heat: np.ndarray, layer: str | None) -> str:
    """The image's description: what is drawn, and plainly when the map is empty."""
    what = _WHAT[method].format(layer=layer)
    out = (f"Sample {index}, its saliency map and the map over the image, for class {cls}: "
           f"{what}. White = 0, full red = the map's largest value.")
    if not np.any(heat > 0):
        out += (" **The map is zero everywhere**" + (
            ": every position's weighted sum of channels is negative or zero, which happens "
            "behind a Flatten + Dense head (its averaged gradients mix both signs); HiResCAM "
            "(`saliency=\"hirescam\"`) does not average them." if method == "gradcam" else "."))
    return out


class SaliencyView(View):
    """Saliency maps of the sample images: each image, its map and the overlay side by side.

    At every `freq`-th snapshot (the initial one included) the training thread
    computes the maps (`saliency`: vanilla, SmoothGrad, Grad-CAM, HiResCAM) for
    the predicted class of each image, or `class_index`; the worker draws them
    (`saliency.panel`) as images `<model>/3_saliency/<method>/sample_<i>`
    (`summaries.saliency_tag`) and, with
    `out_dir`, PNG files `<out_dir>/saliency/<method>/sample_<i>/step_<step>.png`.

    A saliency map is a local, model-specific explanation: it says which
    pixels move this model's score for this image.

    Args:
        sample_images: `(N, H, W, C)` float images, channels last.
        methods: The methods, among "vanilla", "smoothgrad", "gradcam", "hirescam".
        class_index: The class to explain. Defaults to None: each image's predicted class.
        layer: The convolution layer of Grad-CAM and HiResCAM. Defaults to None:
            the last one at the model's top level.
        out_dir: Also write the panels as PNG files here: a directory or any fsspec
            URL. Defaults to None.
        freq: Compute at every `freq`-th snapshot. Defaults to 1.
        storage_options: fsspec options for an `out_dir` URL. Defaults to None.
    """

    name = "saliency"

    def __init__(
        self,
        sample_images: np.ndarray,
        methods: Sequence[str],
        class_index: int | None = Settings.saliency_class,
        layer: str | None = Settings.saliency_layer,
        out_dir: str | None = Settings.responses_dir,
        freq: int = Settings.gradient_freq,
        storage_options: Mapping[str, Any] | None = None,
    ):
        self.sample_images = sample_images
        self.methods = tuple(methods)
        self.class_index = class_index
        self.layer = layer
        self.out_dir = out_dir
        self._pngs = None if out_dir is None else PngFiles(out_dir, storage_options)
        self.freq = freq
        self._images: np.ndarray | None = None
        self._count = 0
        self._group = ""

    def prepare(self, model: Any, info: ModelInfo) -> None:
        from ..saliency import last_conv_layer

        x = self.sample_images
        self._group = model_group(info.name, info.class_name)
        shape = f"Received: sample_images with shape {x.shape}"
        inputs = model_inputs(model)
        if len(inputs) != 1:
            raise ValueError(f"`saliency` needs a model with exactly one (known) input; this "
                             f"model has {len(inputs)}. {shape}")
        dtype = str(getattr(inputs[0], "dtype", None) or "float32")
        if "float" not in dtype:
            raise ValueError(f"`saliency` needs a float model input; it is {dtype}. {shape}")
        self._images = np.asarray(x, dtype=dtype)
        if any(m in CAM_METHODS for m in self.methods):
            if self.layer is None:
                self.layer = last_conv_layer(model)
            else:
                self._check_layer(model, find_layer(model, self.layer, "saliency_layer"))
        self._check_class(model)
        self._count = 0

    def _check_layer(self, model: Any, layer: Any) -> None:
        """Grad-CAM's layer: at the model's top level, writing a 2-D map of channels."""
        if not any(lay is layer for lay in getattr(model, "layers", [])):
            raise ValueError(f"`saliency_layer` must name a layer at the model's top level. "
                             f"{received('saliency_layer', self.layer)}")
        output = getattr(layer, "output", None)
        shape = tuple(output.shape) if output is not None else ()
        if len(shape) != 4:
            raise ValueError(
                f"`saliency_layer` must name a layer with a (batch, h, w, channels) output for "
                f"Grad-CAM; {self.layer!r} outputs shape {shape}. "
                f"{received('saliency_layer', self.layer)}")

    def _check_class(self, model: Any) -> None:
        if self.class_index is None:
            return
        try:
            width = int(np.prod(model.outputs[0].shape[1:]))
        except (AttributeError, ValueError, TypeError, IndexError):
            return  # a subclassed model: the gradient helper checks the index at the snapshot
        if self.class_index >= width:
            raise ValueError(f"`saliency_class` must be below the model's {width} output units. "
                             f"{received('saliency_class', self.class_index)}")

    def capture(self, model: Any) -> dict[str, Any] | None:
        due = self._count % self.freq == 0
        self._count += 1
        if not due or self._images is None:
            return None
        return {m: saliency_maps(model, self._images, m, self.class_index, self.layer)
                for m in self.methods}

    def write(self, snapshot: Snapshot, stats: Stats, payload: Any, events: Any) -> None:
        if payload is None:
            return
        from ..images import encode_png
        from ..saliency import panel
        from ..summaries import image, saliency_tag

        images = np.asarray(self.sample_images)
        values = []
        for method, sal in payload.items():
            for i in range(len(images)):
                pic = panel(images[i], sal.maps[i])
                png = encode_png(pic)
                desc = caption(method, i, int(sal.classes[i]), sal.maps[i], sal.layer)
                name = saliency_tag(self._group, method, i)
                values.append(image(name, [png], pic.shape[1], pic.shape[0], desc))
                if self._pngs is not None:
                    self._pngs.write(f"saliency/{method}/sample_{i}/step_{snapshot.step}.png",
                                     png)
        events.write(snapshot.step, values, wall_time=snapshot.time)
