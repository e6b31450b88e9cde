"""Filtered images: each kernel of a Conv2D layer applied to sample images, in numpy.

`"kernel"` responses are the plain cross-correlation of the layer's input with
each kernel, summed over input channels, with no bias and no activation,
computed with the layer's own `padding`, `strides` and `dilation_rate` as
Keras applies them. So the response maps have the layer's output size, and
adding the bias and applying the activation gives the layer's output.

Padding semantics (the ones every Keras backend follows):

- `"valid"`: no padding; output size `floor((n - ((k - 1) * d + 1)) / s) + 1`.
  With stride 1 and no dilation this equals
  `scipy.signal.correlate2d(image, kernel, mode="valid")` summed over channels.
- `"same"`: output size `ceil(n / s)`; the padding needed is split with the
  smaller half before and the larger half after (TensorFlow's convention).
  For odd kernels and stride 1 this equals `scipy.signal.correlate2d(...,
  mode="same")`; for even kernels the extra row/column goes at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PADDINGS = ("valid", "same")


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    v = tuple(int(x) for x in value)
    if len(v) != 2:
        raise ValueError(f"`{name}` must be an int or a pair of ints. Received: {name}={value!r}")
    return v


def _pads(n: int, k: int, s: int, d: int, padding: str) -> tuple[int, int, int]:
    span = (k - 1) * d + 1
    if padding == "valid":
        return 0, 0, max((n - span) // s + 1, 0)
    out = math.ceil(n / s)
    total = max((out - 1) * s + span - n, 0)
    return total // 2, total - total // 2, out


def correlate(
    images: np.ndarray,
    kernel: np.ndarray,
    strides: int | Sequence[int] = 1,
    padding: str = "valid",
    dilation_rate: int | Sequence[int] = 1,
) -> np.ndarray:
    """Cross-correlate channels-last images with a Keras Conv2D kernel (no bias, no activation).

    Args:
        images: `(N, H, W, C)`.
        kernel: `(kh, kw, C, outputs)`, Keras's Conv2D kernel layout.
        strides: Stride per spatial axis. Defaults to 1.
        padding: `"valid"` or `"same"`, as in Keras. Defaults to `"valid"`.
        dilation_rate: Dilation per spatial axis. Defaults to 1.

    Returns:
        A float64 array `(N, H', W', outputs)`, summed over the C input channels.

    Example:

    >>> img = np.arange(16.0).reshape(1, 4, 4, 1)
    >>> k = np.zeros((3, 3, 1, 1)); k[1, 1] = 1.0  # identity kernel
    >>> correlate(img, k)[0, :, :, 0]
    array([[ 5.,  6.],
           [ 9., 10.]])
    """
    x = np.asarray(images, dtype=np.float64)
    k = np.asarray(kernel, dtype=np.float64)
    if x.ndim != 4:
        raise ValueError(f"`images` must be (N, H, W, C). Received: images.shape={x.shape}")
    if k.ndim != 4 or k.shape[2] != x.shape[3]:
        raise ValueError(
            f"`kernel` must be (kh, kw, {x.shape[3]}, outputs) for images with {x.shape[3]} "
            f"channels. Received: kernel.shape={k.shape}"
        )
    if padding not in PADDINGS:
        raise ValueError(
            f"`padding` must be one of {list(PADDINGS)}. Received: padding={padding!r}"
        )
    sh, sw = _pair(strides, "strides")
    dh, dw = _pair(dilation_rate, "dilation_rate")
    kh, kw = k.shape[:2]
    top, bottom, oh = _pads(x.shape[1], kh, sh, dh, padding)
    left, right, ow = _pads(x.shape[2], kw, sw, dw, padding)
    if top or bottom or left or right:
        x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out = np.zeros((x.shape[0], oh, ow, k.shape[3]))
    if oh == 0 or ow == 0:
        return out
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dh, j * dw
            patch = x[:, y0 : y0 + (oh - 1) * sh + 1 : sh, x0 : x0 + (ow - 1) * sw + 1 : sw, :]
            out += patch @ k[i, j]
    return out
