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

To draw a response over the image it came from, `at_input_size` resamples it onto the
input's pixels (nearest neighbour around each output's receptive-field centre,
`source_index`), so a strided layer's map is as large as its input.
"""

from __future__ import annotations

import dataclasses
import functools
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
            if k.shape[2] == 1:  # one input channel: a product, no sum (the same values)
                out += patch * k[i, j, 0]
            else:
                out += patch @ k[i, j]
    return out


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a Conv2D layer's output pixels sit on its input: its kernel size and sampling.

    Attributes:
        kernel_size: `(kh, kw)`.
        strides: Stride per spatial axis.
        padding: `"valid"` or `"same"`.
        dilation_rate: Dilation per spatial axis.
        input_size: The layer input's `(H, W)` where it is not the sample
            image's (a layer after pooling); None: the image's.
    """

    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: str = "valid"
    dilation_rate: tuple[int, int] = (1, 1)
    input_size: tuple[int, int] | None = None

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The response's `(h, w)` for an input of `size` `(H, W)`."""
        return tuple(  # type: ignore[return-value]
            _pads(n, k, s, d, self.padding)[2]
            for n, k, s, d in zip(size, self.kernel_size, self.strides, self.dilation_rate)
        )


def source_index(n: int, k: int, s: int = 1, d: int = 1, padding: str = "valid") -> np.ndarray:
    """For each of `n` input positions on one axis, the output whose receptive field is centred
    nearest to it, or -1 where no output is centred within half a stride (the border
    that `"valid"` padding leaves out).

    Output `o`'s receptive field is centred on input position
    `o * s - pad_before + ((k - 1) * d) / 2`; an input position takes the output
    centred nearest to it (ties to the later one). So upsampling by this index is
    nearest-neighbour resampling that keeps each response over the pixels it was
    computed from.

    Example:

    >>> source_index(6, 3).tolist()  # valid, stride 1: the outer pixels have no output
    [-1, 0, 1, 2, 3, -1]
    >>> source_index(6, 3, s=2, padding="same").tolist()
    [0, 0, 1, 1, 2, 2]
    """
    return _source_index(n, k, s, d, padding).copy()


@functools.lru_cache(maxsize=256)
def _source_index(n: int, k: int, s: int, d: int, padding: str) -> np.ndarray:
    """`source_index`, computed once per axis geometry (read-only)."""
    before, _, out = _pads(n, k, s, d, padding)
    if out == 0:
        return _frozen(np.full(n, -1, dtype=np.int64))
    centre0 = ((k - 1) * d) / 2 - before
    y = np.arange(n)
    o = np.clip(np.floor((y - centre0) / s + 0.5).astype(np.int64), 0, out - 1)
    return _frozen(np.where(np.abs(y - (centre0 + o * s)) <= s / 2, o, -1))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=256)
def _stretch_index(n: int, size: int) -> np.ndarray:
    """Nearest-neighbour indices that stretch `n` positions over `size` (proportionally)."""
    return _frozen(np.minimum(((np.arange(size) + 0.5) * n / size).astype(np.int64), n - 1))


def at_input_size(
    maps: np.ndarray, size: tuple[int, int], geometry: Geometry | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Response maps `(..., h, w, outputs)` drawn on the sample image's `(H, W)` grid.

    With a `geometry`, nearest-neighbour resampling by `source_index` on each
    axis: a strided layer's response pixel covers the `strides` input pixels
    around its receptive field's centre. When the layer's input is not the
    image (`geometry.input_size`, a layer after pooling), the maps are placed
    on that input so, then stretched to `size` by nearest neighbour. Without a
    geometry, the maps are only stretched.

    Returns:
        The maps at `(..., H, W, outputs)`, and a boolean `(H, W)` mask of the
        pixels some output covers (elsewhere the maps hold 0).

    Example:

    >>> m = np.arange(4.0).reshape(2, 2, 1)  # a 3x3 stride-2 'same' layer on a 4x4 image
    >>> out, covered = at_input_size(m, (4, 4), Geometry((3, 3), (2, 2), "same"))
    >>> out[..., 0].tolist()[0], bool(covered.all())
    ([0.0, 0.0, 1.0, 1.0], True)
    """
    m = np.asarray(maps)
    if m.ndim < 3:
        raise ValueError(f"maps must be (..., h, w, outputs). Received: maps.shape={m.shape}")
    if geometry is None:
        base: tuple[int, int] = (m.shape[-3], m.shape[-2])
        covered = np.ones(base, dtype=bool)
    else:
        base = geometry.input_size or (int(size[0]), int(size[1]))
        m, covered = _placed(m, base, geometry)
    if base != tuple(size):
        rows, cols = _stretch_index(base[0], size[0]), _stretch_index(base[1], size[1])
        m = m[..., rows, :, :][..., cols, :]
        covered = covered[rows][:, cols]
    return m, covered


def _placed(m: np.ndarray, base: tuple[int, int], g: Geometry) -> tuple[np.ndarray, np.ndarray]:
    expected = g.output_size(base)
    if tuple(m.shape[-3:-1]) != expected:
        raise ValueError(
            f"responses of an input of size {base} through {g} are {expected}. "
            f"Received: maps.shape={m.shape}"
        )
    rows, cols, covered = _placement(base, _hashable(g))
    out = m[..., rows, :, :][..., cols, :]
    return np.where(covered[..., None], out, 0), covered.copy()


def _hashable(g: Geometry) -> Geometry:
    """`g` with plain int tuples (a key of the caches below)."""

    def pair(v: Sequence[int]) -> tuple[int, int]:
        return int(v[0]), int(v[1])

    size = None if g.input_size is None else pair(g.input_size)
    return Geometry(pair(g.kernel_size), pair(g.strides), str(g.padding),
                    pair(g.dilation_rate), size)


@functools.lru_cache(maxsize=64)
def _placement(base: tuple[int, int], g: Geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows and columns of the maps that `_placed` draws on `base` (0 where no output
    is), and the `(H, W)` mask of the covered pixels; read-only, computed once per shape."""
    rows = _source_index(base[0], g.kernel_size[0], g.strides[0], g.dilation_rate[0], g.padding)
    cols = _source_index(base[1], g.kernel_size[1], g.strides[1], g.dilation_rate[1], g.padding)
    covered = (rows >= 0)[:, None] & (cols >= 0)[None, :]
    return _frozen(np.maximum(rows, 0)), _frozen(np.maximum(cols, 0)), _frozen(covered)


def pixel_sources(
    maps_shape: tuple[int, ...], size: tuple[int, int], geometry: Geometry | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Where `at_input_size` takes each pixel of the `size` grid from, as one index.

    Args:
        maps_shape: The maps' shape `(..., h, w, outputs)`.
        size: The sample image's `(H, W)`.
        geometry: As for `at_input_size`.

    Returns:
        A read-only `(H * W,)` array of flat (row-major) indices into the `h * w`
        map pixels (0 where no output covers the pixel), and the read-only
        `(H, W)` mask of the covered pixels. `at_input_size(maps, size,
        geometry)` holds the maps' pixels taken by this index, and 0 at the
        uncovered pixels. Computed once per shape and geometry.

    Raises:
        ValueError: The maps are not the layer's output size under `geometry`.
    """
    h, w = int(maps_shape[-3]), int(maps_shape[-2])
    if geometry is not None:
        base = geometry.input_size or (int(size[0]), int(size[1]))
        expected = geometry.output_size(base)
        if (h, w) != tuple(expected):
            raise ValueError(
                f"responses of an input of size {base} through {geometry} are {expected}. "
                f"Received: maps.shape={tuple(maps_shape)}"
            )
    g = None if geometry is None else _hashable(geometry)
    return _pixel_sources((h, w), (int(size[0]), int(size[1])), g)


@functools.lru_cache(maxsize=64)
def _pixel_sources(
    shape: tuple[int, int], size: tuple[int, int], g: Geometry | None
) -> tuple[np.ndarray, np.ndarray]:
    if g is None:
        base = shape
        rows, cols = np.arange(shape[0]), np.arange(shape[1])
        covered = np.ones(base, dtype=bool)
    else:
        base = g.input_size or size
        rows, cols, covered = _placement(base, g)
    if base != size:
        r, c = _stretch_index(base[0], size[0]), _stretch_index(base[1], size[1])
        rows, cols, covered = rows[r], cols[c], covered[r][:, c]
    flat = (rows[:, None] * shape[1] + cols[None, :]).reshape(-1)
    return _frozen(flat), _frozen(covered)
