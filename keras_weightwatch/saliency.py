"""Where the model looks in an image: vanilla gradient, SmoothGrad and Grad-CAM maps.

Each method explains one class per image: the predicted class (the argmax of
the model's output on the clean image) or a chosen one. The model's output
unit is used as it is: for a model that ends in a softmax that is the class
probability; Grad-CAM's paper differentiates the score before the softmax.

- `vanilla`: |∂score/∂x|, the largest over the image's channels (Simonyan et
  al., 2014).
- `smoothgrad`: the mean of the vanilla maps of `n` copies of the image with
  Gaussian noise of standard deviation `noise` times the image's value range
  added (Smilkov et al., 2017), drawn from a seeded generator; the class is
  the clean image's.
- `gradcam`: on a convolution layer's output A (h, w, K) and the gradient G of
  the class score with respect to it, the channel weights are G averaged over
  the positions, the map is the ReLU of the weighted sum of A's channels
  (Selvaraju et al., 2017), upsampled bilinearly to the image's size.
  Grad-CAM suits a layer followed by global pooling; behind `Flatten` and
  `Dense` the averaged gradients mix position-specific weights of both signs,
  and the map can be zero everywhere (as it is for a small digits CNN after
  five epochs, at both of its convolutions).

- `hirescam`: HiResCAM (Draelos and Carin, 2020): the ReLU of the sum over
  channels of A times G position by position, not G averaged first; for a
  head of `Flatten` and `Dense` it is the exact contribution of each position
  to the score (when the head is linear), so it is not emptied by gradients
  of both signs, as Grad-CAM's map can be.

A saliency map is a local, model-specific explanation: it says which pixels
move this model's score for this image, not what the class looks like.

The maps are computed by `gradients.gradients` (one batch per method); the
rest is numpy. `overlay` and `panel` draw a map over its image with the
colour code of `images` (zero heat leaves the image, the largest is full red).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from keras_weightwatch import images as _images
from keras_weightwatch.errors import received
from keras_weightwatch.gradients import Unit, gradients
from keras_weightwatch.naming import conv_kind

SMOOTHGRAD_SAMPLES = 8
SMOOTHGRAD_NOISE = 0.15
OVERLAY_ALPHA = 0.6


@dataclasses.dataclass(frozen=True)
class Saliency:
    """Saliency maps of a batch of images.

    Attributes:
        method: `"vanilla"`, `"smoothgrad"`, `"gradcam"` or `"hirescam"`.
        maps: `(n, H, W)` float64, >= 0, at the images' size.
        classes: `(n,)` the class each map explains.
        layer: Grad-CAM's (or HiResCAM's) layer (None for the other methods).
    """

    method: str
    maps: np.ndarray
    classes: np.ndarray
    layer: str | None = None


def _check_images(images: Any) -> np.ndarray:
    x = np.asarray(images)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"saliency needs a float batch of images (n, H, W, C). "
            f"Received: images.shape={x.shape}, dtype={x.dtype}"
        )
    return x


def _classes(model: Any, x: np.ndarray, class_index: int | Sequence[int] | None) -> np.ndarray:
    if class_index is not None:
        return np.broadcast_to(np.asarray(class_index, dtype=np.int64), (len(x),)).copy()
    import keras

    out = keras.tree.flatten(model(x, training=False))[0]
    return np.argmax(np.asarray(keras.ops.convert_to_numpy(out)).reshape(len(x), -1), axis=-1)


def channel_max(grad: np.ndarray) -> np.ndarray:
    """`(n, H, W, C)` gradients -> `(n, H, W)`: the largest |gradient| over the channels."""
    return np.abs(np.asarray(grad, dtype=np.float64)).max(axis=-1)


def vanilla(model: Any, images: Any, class_index: int | Sequence[int] | None = None) -> Saliency:
    """|∂score/∂x| of each image, the largest over its channels.

    Args:
        model: A Keras model taking the images.
        images: `(n, H, W, C)` float.
        class_index: The class to explain: one for all, one per image, or
            None for each image's predicted class. Defaults to None.
    """
    x = _check_images(images)
    g = gradients(model, x, Unit(None if class_index is None else _classes(model, x, class_index)),
                  inputs=True)
    return Saliency("vanilla", channel_max(g.inputs), np.asarray(g.units))


def smoothgrad(
    model: Any,
    images: Any,
    class_index: int | Sequence[int] | None = None,
    samples: int = SMOOTHGRAD_SAMPLES,
    noise: float = SMOOTHGRAD_NOISE,
    seed: int = 0,
) -> Saliency:
    """The mean vanilla map of `samples` noisy copies of each image (one batch).

    Args:
        samples: Noisy copies per image. Defaults to 8.
        noise: The noise's standard deviation as a fraction of each image's
            value range (max - min). Defaults to 0.15.
        seed: Seed of the noise generator. Defaults to 0.
    """
    x = _check_images(images)
    if samples < 1 or noise < 0:
        raise ValueError(f"smoothgrad needs samples >= 1 and noise >= 0. "
                         f"Received: samples={samples}, noise={noise}")
    classes = _classes(model, x, class_index)
    span = (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3))).reshape(-1, 1, 1, 1)
    rng = np.random.default_rng(seed)
    copies = np.repeat(x, samples, axis=0)
    noisy = (copies + rng.normal(size=copies.shape) * np.repeat(span, samples, axis=0) * noise)
    g = gradients(model, noisy.astype(x.dtype), Unit(np.repeat(classes, samples)), inputs=True)
    maps = channel_max(g.inputs).reshape(len(x), samples, *x.shape[1:3]).mean(axis=1)
    return Saliency("smoothgrad", maps, classes)


def last_conv_layer(model: Any) -> str:
    """The name of the model's last top-level convolution layer (Grad-CAM's default)."""
    names = [lay.name for lay in getattr(model, "layers", []) if conv_kind(type(lay).__name__)]
    if not names:
        raise ValueError(
            "Grad-CAM needs a convolution layer; the model has none at its top level. "
            f"Received: model={getattr(model, 'name', model)!r}"
        )
    return str(names[-1])


def gradcam(
    model: Any,
    images: Any,
    layer: str | None = None,
    class_index: int | Sequence[int] | None = None,
) -> Saliency:
    """Grad-CAM maps on a convolution layer (the last one unless named), at the images' size."""
    return _cam(model, images, layer, class_index, "gradcam")


def _cam(model: Any, images: Any, layer: str | None, class_index: Any, method: str) -> Saliency:
    """A class activation map of `method` ("gradcam" or "hirescam") on a convolution layer."""
    x = _check_images(images)
    name = layer or last_conv_layer(model)
    index = None if class_index is None else _classes(model, x, class_index)
    g = gradients(model, x, Unit(index), layer=name)
    acts, grads = g.activations, g.activation_gradients
    if acts is None or grads is None or acts.ndim != 4:
        raise ValueError(f"Grad-CAM needs a 2-D convolution's (n, h, w, channels) output. "
                         f"Received: layer={name!r} output shape "
                         f"{None if acts is None else acts.shape}")
    if getattr(model.get_layer(name), "data_format", "channels_last") == "channels_first":
        acts, grads = np.moveaxis(acts, 1, -1), np.moveaxis(grads, 1, -1)
    combine = hirescam_maps if method == "hirescam" else gradcam_maps
    maps = resize_bilinear(combine(acts, grads), x.shape[1:3])
    return Saliency(method, maps, np.asarray(g.units), name)


def hirescam(
    model: Any,
    images: Any,
    layer: str | None = None,
    class_index: int | Sequence[int] | None = None,
) -> Saliency:
    """HiResCAM maps on a convolution layer (the last one unless named), at the images' size."""
    return _cam(model, images, layer, class_index, "hirescam")


def hirescam_maps(activations: np.ndarray, activation_gradients: np.ndarray) -> np.ndarray:
    """`(n, h, w, K)` activations and gradients -> `(n, h, w)` HiResCAM maps (ReLU'd).

    >>> a = np.stack([np.eye(2), np.ones((2, 2))], axis=-1)[None]
    >>> g = np.stack([np.eye(2), -np.eye(2)], axis=-1)[None]
    >>> hirescam_maps(a, g)[0]  # ReLU(eye * eye - ones * eye)
    array([[0., 0.],
           [0., 0.]])
    >>> hirescam_maps(a, np.stack([np.eye(2), np.zeros((2, 2))], axis=-1)[None])[0]
    array([[1., 0.],
           [0., 1.]])
    """
    a = np.asarray(activations, dtype=np.float64)
    g = np.asarray(activation_gradients, dtype=np.float64)
    return np.maximum((a * g).sum(axis=-1), 0.0)


def gradcam_maps(activations: np.ndarray, activation_gradients: np.ndarray) -> np.ndarray:
    """`(n, h, w, K)` activations and gradients -> `(n, h, w)` Grad-CAM maps (ReLU'd).

    Example: channel 0 is weighted by its mean gradient 1, channel 1 by -1.

    >>> a = np.stack([np.eye(2), np.ones((2, 2))], axis=-1)[None]
    >>> g = np.stack([np.ones((2, 2)), -np.ones((2, 2))], axis=-1)[None]
    >>> gradcam_maps(a, 2 * g)[0]  # ReLU(2 * eye - 2 * ones)
    array([[0., 0.],
           [0., 0.]])
    >>> gradcam_maps(a, np.stack([g[..., 0], 0 * g[..., 1]], axis=-1))[0]
    array([[1., 0.],
           [0., 1.]])
    """
    a = np.asarray(activations, dtype=np.float64)
    g = np.asarray(activation_gradients, dtype=np.float64)
    alpha = g.mean(axis=(1, 2), keepdims=True)  # (n, 1, 1, K)
    return np.maximum((a * alpha).sum(axis=-1), 0.0)


def resize_bilinear(maps: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Resize `(n, h, w)` maps to `(n, H, W)` bilinearly with half-pixel centres.

    The convention of `tf.image.resize(method="bilinear", antialias=False)`:
    output pixel i samples the input at `(i + 0.5) * h / H - 0.5`, clamped to
    the edge.

    >>> resize_bilinear(np.array([[[0.0, 1.0]]]), (1, 4))
    array([[[0.  , 0.25, 0.75, 1.  ]]])
    """
    m = np.asarray(maps, dtype=np.float64)
    out_h, out_w = int(size[0]), int(size[1])
    ys = _sample_points(m.shape[1], out_h)
    xs = _sample_points(m.shape[2], out_w)
    rows = _lerp(m, ys, axis=1)
    return _lerp(rows, xs, axis=2)


def _sample_points(n_in: int, n_out: int) -> np.ndarray:
    return np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)


def _lerp(a: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, a.shape[axis] - 1)
    t = (pos - lo).reshape([-1 if i == axis else 1 for i in range(a.ndim)])
    return np.take(a, lo, axis=axis) * (1 - t) + np.take(a, hi, axis=axis) * t


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """A saliency map drawn over its image: uint8 RGB `(H, W, 3)`.

    The image is drawn as `images.intensity_rgb` draws it; each pixel is
    blended towards the heat's colour (`images.diverging_rgb`, zero near-white
    to the largest value full red) by `alpha` times the heat over its maximum,
    so a pixel without heat shows the image unchanged. Non-finite heat is
    drawn in `images.NONFINITE_RGB`.
    """
    img = np.asarray(image)
    h = np.asarray(heat, dtype=np.float64)
    if img.ndim != 3 or h.shape != img.shape[:2]:
        raise ValueError(f"overlay needs an (H, W, C) image and an (H, W) map. "
                         f"Received: image.shape={img.shape}, heat.shape={h.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]. {received('alpha', alpha)}")
    base = _images.intensity_rgb(img if img.shape[-1] == 3 else img[..., 0]).astype(np.float64)
    vmax = _images.symmetric_limit(h)
    colour = _images.diverging_rgb(h, vmax).astype(np.float64)
    finite = np.isfinite(h)
    t = np.where(finite, np.clip(h, 0, None) / vmax, 0.0) if vmax > 0 else np.zeros_like(h)
    t = np.where(finite, alpha * t, 1.0)[..., None]
    return np.rint(base * (1 - t) + colour * t).astype(np.uint8)


def panel(image: np.ndarray, heat: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image, its heatmap and the overlay side by side (uint8 RGB; `images.encode_png` it)."""
    img = np.asarray(image)
    shown = img if img.shape[-1] == 3 else img[..., 0]
    vmax = _images.symmetric_limit(heat)
    tiles = [_images.intensity_rgb(shown), _images.diverging_rgb(heat, vmax),
             overlay(img, heat, alpha)]
    out, _, _ = _images.compose(tiles, cols=3)
    return out
