"""Kernel and response grids as RGB images, and a PNG encoder (zlib, or ISA-L where installed).

Colours: weights are normalised symmetrically around zero (by the largest
finite |w| of the grid) and drawn with a diverging colour map, blue for
negative, near-white for zero, red for positive. Kernels with exactly three
input channels can be drawn as RGB pictures instead (zero is mid-grey, as in
the classic AlexNet filter figure). NaN and Inf are drawn in `NONFINITE_RGB`
(bright green, a colour the diverging map never uses). Tiles are upscaled by
nearest neighbour, so every pixel of a tile is exactly one weight, and are
separated by dark lines.

Response tiles are drawn at the sample image's size, each on its own scale around
its own mean (see `response_grid`); pixels no output covers are `UNCOVERED_RGB`
(mid-grey).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .responses import Geometry, at_input_size, pixel_sources

NONFINITE_RGB = (0, 255, 0)
UNCOVERED_RGB = (128, 128, 128)
SEPARATOR_RGB = (48, 48, 48)
# RdBu-like control points from -1 to 1 (blue, light blue, near-white, light red, red).
_CMAP_X = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
_CMAP_RGB = np.array(
    [[33, 102, 172], [103, 169, 207], [247, 247, 247], [239, 138, 98], [178, 24, 43]],
    dtype=np.float64,
)
MIN_TILE_PX = 24
MAX_IMAGE_PX = 2048
MAX_COLUMNS = 16
# zlib level of the PNGs when ISA-L is not installed: grids are flat colour blocks, which
# level 1 packs almost as well as the default 6 at a fraction of the CPU (the worker's time
# is training's time on 2 cores).
PNG_LEVEL = 1
# ISA-L's level of the PNGs (its levels are 0-3): the 6 PNGs of a snapshot of the reference
# CNN in 0.9 ms against zlib level 1's 3.8 ms, 15% larger (benchmarks/README.md).
ISAL_PNG_LEVEL = 2
# Buckets of the colour map's lookup table over [-1, 1] (see `_colour_steps`).
_BUCKETS = 1 << 16


def symmetric_limit(values: np.ndarray) -> float:
    """The largest finite |value| (0.0 when there is none): the grid's colour scale."""
    x = np.asarray(values, dtype=np.float64)
    x = np.abs(x[np.isfinite(x)])
    return float(x.max()) if x.size else 0.0


def _cmap(t: np.ndarray) -> np.ndarray:
    """The colour map itself: `t` in [-1, 1] to uint8 RGB by linear interpolation."""
    out = np.empty(t.shape + (3,), dtype=np.float64)
    for c in range(3):
        out[..., c] = np.interp(t, _CMAP_X, _CMAP_RGB[:, c])
    return np.rint(out).astype(np.uint8)


def _step_points() -> np.ndarray:
    """Every `t` at which a channel of `_cmap` changes (the smallest `t` with the new value).

    Between two control points each channel is monotone, so the first `t` at
    which it reaches each level between its end values is found by bisection
    down to adjacent floats.
    """
    lo, hi, level, chan, sign = [], [], [], [], []
    for c in range(3):
        for j in range(len(_CMAP_X) - 1):
            y0, y1 = int(_CMAP_RGB[j, c]), int(_CMAP_RGB[j + 1, c])
            for v in range(y0 + 1, y1 + 1) if y1 > y0 else range(y1, y0):
                lo.append(_CMAP_X[j])
                hi.append(_CMAP_X[j + 1])
                level.append(v)
                chan.append(c)
                sign.append(1 if y1 > y0 else -1)
    a, b = np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64)
    target = np.array(sign) * np.array(level)
    pick = (np.arange(len(a)), np.array(chan))
    while True:
        mid = a + (b - a) / 2
        active = (mid > a) & (mid < b)
        if not active.any():
            return np.unique(b)
        reached = np.array(sign) * _cmap(mid)[pick].astype(np.int64) >= target
        b = np.where(active & reached, mid, b)
        a = np.where(active & ~reached, mid, a)


@functools.lru_cache(maxsize=1)
def _colour_steps() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_cmap` as steps: each colour's index is how many step points are <= `t`.

    Returns:
        The sorted step points; the palette (colour `i` for `t` from step point
        `i - 1` up to step point `i`, then `NONFINITE_RGB` and `UNCOVERED_RGB`);
        and for each of `_BUCKETS` equal buckets of [-1, 1] its colour index, or
        -1 where a step point lies within two buckets of it (the index is then
        looked up among the step points).
    """
    points = _step_points()
    palette = np.concatenate([_cmap(np.concatenate([[-1.0], points])),
                              np.array([NONFINITE_RGB, UNCOVERED_RGB], dtype=np.uint8)])
    k = np.arange(_BUCKETS)
    first = np.searchsorted(points, -1.0 + 2.0 * (k - 2) / _BUCKETS, "left")
    last = np.searchsorted(points, -1.0 + 2.0 * (k + 3) / _BUCKETS, "right")
    table = np.where(first == last, first, -1).astype(np.int16)
    for a in (points, palette, table):
        a.flags.writeable = False
    return points, palette, table


def _colour_codes(t: np.ndarray) -> np.ndarray:
    """Palette indices (`_colour_steps`) of the finite values `t` (clipped to [-1, 1])."""
    if np.ndim(t) == 0:
        return _colour_codes(np.reshape(t, 1)).reshape(())
    points, _, table = _colour_steps()
    half = _BUCKETS / 2
    u = np.clip(t, -1.0, 1.0)
    u *= half
    u += half
    bucket = u.astype(np.intp)
    np.minimum(bucket, _BUCKETS - 1, out=bucket)
    codes = table.take(bucket)
    near = codes < 0
    if near.any():
        codes[near] = np.searchsorted(points, t[near], "right")
    return codes


def diverging_rgb(values: np.ndarray, vmax: float) -> np.ndarray:
    """Map values to colours: `-vmax` blue, 0 near-white, `+vmax` red; non-finite green.

    Args:
        values: Any real array.
        vmax: The magnitude drawn at full colour (values beyond it are
            clipped); 0 draws every finite value as zero.

    Returns:
        A uint8 array of shape `values.shape + (3,)`.

    Example:

    >>> diverging_rgb(np.array([-1.0, 0.0, 1.0, np.nan]), 1.0).tolist()
    [[33, 102, 172], [247, 247, 247], [178, 24, 43], [0, 255, 0]]
    """
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    t = np.where(finite, x, 0.0) / vmax if vmax > 0 else np.zeros_like(x)
    out = _colour_steps()[1].take(_colour_codes(t), axis=0)
    if not finite.all():
        out[~finite] = NONFINITE_RGB
    return out


def signed_rgb(values: np.ndarray, vmax: float) -> np.ndarray:
    """Draw a `(..., 3)` array as RGB: 0 is mid-grey (128), `+vmax` full channel, `-vmax` none.

    Non-finite values turn their whole pixel `NONFINITE_RGB`.
    """
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    t = np.where(finite, x, 0.0) / vmax if vmax > 0 else np.zeros_like(x)
    out = np.rint(128.0 + 127.0 * np.clip(t, -1.0, 1.0)).astype(np.uint8)
    out[~np.all(finite, axis=-1)] = NONFINITE_RGB
    return out


def intensity_rgb(values: np.ndarray) -> np.ndarray:
    """Draw an image `(h, w)` (grey) or `(h, w, 3)` (colour) min-max scaled to 0..255."""
    x = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(x)
    lo = float(x[finite].min()) if finite.any() else 0.0
    hi = float(x[finite].max()) if finite.any() else 0.0
    t = (np.where(finite, x, lo) - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    v = np.rint(255.0 * t).astype(np.uint8)
    if v.ndim == 2:
        out = np.repeat(v[..., None], 3, axis=-1)
        out[~finite] = NONFINITE_RGB
    else:
        out = v
        out[~np.all(finite, axis=-1)] = NONFINITE_RGB
    return out


def upscale(img: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling of an `(h, w, ...)` image by an integer factor."""
    if scale == 1:
        return img
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A grid image and where each tile sits in it.

    Attributes:
        image: uint8 RGB array `(height, width, 3)`.
        tiles: What each tile shows, in drawing order (`(input, output)` for
            kernels, a label for response grids).
        origins: The `(y, x)` pixel of each tile's top-left corner.
        scale: Pixels per weight (nearest-neighbour upscaling factor).
        vmax: The |value| drawn at full colour.
        total: How many tiles there would be without the cap.
        rgb: Whether kernel tiles are drawn as RGB pictures.
        means: Response grids: each response tile's mean (drawn white).
        scales: Response grids: each response tile's largest |r - mean|
            (drawn at full colour); `vmax` is then 1.0.
    """

    image: np.ndarray
    tiles: tuple
    origins: tuple[tuple[int, int], ...]
    scale: int
    vmax: float
    total: int
    rgb: bool = False
    means: tuple[float, ...] = ()
    scales: tuple[float, ...] = ()

    @property
    def truncated(self) -> bool:
        return len(self.tiles) < self.total


def _choose_scale(cell_h: int, cell_w: int, rows: int, cols: int, sep: int) -> int:
    scale = max(1, math.ceil(MIN_TILE_PX / max(cell_h, cell_w, 1)))
    while (
        scale > 1
        and max(rows * (cell_h * scale + sep), cols * (cell_w * scale + sep)) > MAX_IMAGE_PX
    ):
        scale -= 1
    return scale


def compose(
    tiles: Sequence[np.ndarray] | np.ndarray,
    cols: int,
    scale: int | None = None,
    sep: int | None = None,
) -> tuple[np.ndarray, tuple[tuple[int, int], ...], int]:
    """Lay out RGB tiles in a grid with separators; tiles are upscaled by `scale`.

    Every cell is as large as the largest tile; a smaller tile sits in its
    cell's top-left corner on the separator colour.

    Args:
        tiles: `(h, w, 3)` uint8 tiles, or one `(n, h, w, 3)` array of them.
        cols: Tiles per row (at most).
        scale: Pixels per tile pixel. Defaults to None: chosen from the sizes.
        sep: Separator width. Defaults to None: 2 when upscaled, else 1.

    Returns:
        The image, each tile's `(y, x)` origin, and the scale used.
    """
    n = len(tiles)
    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    if isinstance(tiles, np.ndarray) and tiles.ndim == 4:
        cell_h, cell_w = int(tiles.shape[1]), int(tiles.shape[2])
    else:
        cell_h = max(t.shape[0] for t in tiles)
        cell_w = max(t.shape[1] for t in tiles)
    if scale is None:
        scale = _choose_scale(cell_h, cell_w, rows, cols, 2)
    if sep is None:
        sep = 2 if scale > 1 else 1
    cells = np.empty((rows * cols, cell_h, cell_w, 3), dtype=np.uint8)
    if all(t.shape == (cell_h, cell_w, 3) for t in _shapes_of(tiles)):
        cells[:n] = tiles
        cells[n:] = SEPARATOR_RGB
    else:
        cells[:] = SEPARATOR_RGB
        for i, tile in enumerate(tiles):
            cells[i, : tile.shape[0], : tile.shape[1]] = tile
    origins = _origins(n, cols, cell_h * scale + sep, cell_w * scale + sep, sep)
    return _lay_out(cells, rows, cols, scale, sep), origins, scale


def _shapes_of(tiles: Sequence[np.ndarray] | np.ndarray) -> Sequence[np.ndarray] | np.ndarray:
    """The tiles to check the shape of: one for a stacked array (all alike)."""
    return tiles[:1] if isinstance(tiles, np.ndarray) and tiles.ndim == 4 else tiles


@functools.lru_cache(maxsize=64)
def _origins(n: int, cols: int, step_h: int, step_w: int, sep: int) -> tuple[tuple[int, int], ...]:
    """The top-left pixel of each of `n` cells, `cols` to a row, `step_*` apart after `sep`."""
    return tuple((sep + r * step_h, sep + c * step_w)
                 for r, c in (divmod(i, cols) for i in range(n)))


def _lay_out(cells: np.ndarray, rows: int, cols: int, scale: int, sep: int) -> np.ndarray:
    """Cells `(rows * cols, ch, cw, 3)` upscaled by `scale` into a grid with separators.

    Each row of pixels of a cell row is built once, then repeated `scale` times:
    whole image rows are copied, never single pixels.
    """
    ch, cw = cells.shape[1:3]
    h = rows * (ch * scale + sep) + sep
    w = cols * (cw * scale + sep) + sep
    out = np.empty((h, w, 3), dtype=np.uint8)
    sep_row = np.empty((w, 3), dtype=np.uint8)
    sep_row[:] = SEPARATOR_RGB
    out[:sep] = sep_row
    body = out[sep:].reshape(rows, ch * scale + sep, w, 3)
    body[:, ch * scale :] = sep_row
    lines = body[:, : ch * scale].reshape(rows, ch, scale, w, 3)
    first = lines[:, :, 0]  # (rows, ch, w, 3): each distinct pixel row
    first[:, :, :sep] = SEPARATOR_RGB
    slots = first[:, :, sep:].reshape(rows, ch, cols, cw * scale + sep, 3)
    slots[:, :, :, cw * scale :] = SEPARATOR_RGB
    band = cells.reshape(rows, cols, ch, cw, 3).transpose(0, 2, 1, 3, 4)
    slots[:, :, :, : cw * scale] = band.repeat(scale, axis=3) if scale > 1 else band
    if scale > 1:
        lines[:, :, 1:] = lines[:, :, :1]
    return out


def _spatial_2d(k: np.ndarray) -> np.ndarray:
    """(spatial..., c, t) -> (h, w, c, t): 1-D kernels as a row, 3-D depth slices side by side."""
    if k.ndim == 3:
        return k[None]
    if k.ndim == 4:
        return k
    if k.ndim == 5:
        d, h, w, c, t = k.shape
        return np.transpose(k, (1, 0, 2, 3, 4)).reshape(h, d * w, c, t)
    raise ValueError(
        f"a convolution kernel has 3 to 5 dimensions (spatial..., inputs, outputs). "
        f"Received: kernel.shape={k.shape}"
    )


@functools.lru_cache(maxsize=64)
def _tile_index(c: int, t: int, max_tiles: int, rgb: bool) -> tuple[tuple[int | None, int], ...]:
    """What each kernel tile shows: `(None, output)` (RGB) or `(input, output)`, inputs major."""
    if rgb:
        return tuple((None, o) for o in range(min(t, max_tiles)))
    return tuple(divmod(i, t) for i in range(c * t)[:max_tiles])


def kernel_grid(kernel: np.ndarray, max_tiles: int = 256, rgb: bool | None = None) -> Grid:
    """All kernels of a convolution layer as one grid image.

    The kernel has Keras's layout `(spatial..., inputs, outputs)` (for
    transposed convolutions `(spatial..., outputs, inputs)`: pass it as is,
    the second-to-last axis is then the colour axis). With `rgb` the three
    input channels of each output form one colour tile (one tile per output);
    otherwise there is one tile per `(input, output)` pair, inputs major, at
    most `max_tiles` of them. 1-D kernels are drawn as one row; 3-D kernels
    with their depth slices side by side.

    Args:
        kernel: The kernel array (3-D, 4-D or 5-D).
        max_tiles: The most tiles drawn. Defaults to 256.
        rgb: Draw RGB tiles. Defaults to None: when there are exactly 3
            inputs.

    Returns:
        A `Grid`; `tiles[i]` is `(input, output)` (input None for RGB tiles).

    Example:

    >>> g = kernel_grid(np.ones((3, 3, 1, 5)))
    >>> len(g.tiles), g.scale
    (5, 8)
    """
    k = _spatial_2d(np.asarray(kernel))
    h, w, c, t = k.shape
    if rgb is None:
        rgb = c == 3
    if rgb and c != 3:
        raise ValueError(
            f"RGB tiles need 3 input channels. Received: kernel.shape={np.shape(kernel)}"
        )
    total = t if rgb else c * t
    index = _tile_index(c, t, max_tiles, bool(rgb))
    n = len(index)
    if rgb:  # (n, h, w, 3): filter o's three input channels
        drawn = np.moveaxis(k[..., :n], -1, 0)
    else:  # (n, h, w): pair (i, o) is column i * t + o of the flattened channels
        drawn = np.moveaxis(k.reshape(h, w, c * t)[..., :n], -1, 0)
    vmax = symmetric_limit(drawn)
    # Colour every tile in one call, then cut the result into tiles.
    if rgb:
        tiles = signed_rgb(drawn, vmax)
        cols = math.ceil(math.sqrt(n))
    else:
        tiles = diverging_rgb(drawn, vmax)
        cols = t if t <= MAX_COLUMNS else math.ceil(math.sqrt(n))
    image, origins, scale = compose(tiles, cols)
    return Grid(image, index, origins, scale, vmax, total, bool(rgb))


def _centred(
    maps: np.ndarray, covered: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each tile `(n, H, W)` minus its mean, over its own largest |deviation|.

    Means and scales are taken over each tile's covered finite pixels.

    Returns:
        The scaled tiles (in [-1, 1]; 0 where a value is not finite or not
        covered), where the values are finite, each tile's mean and scale.
    """
    x = np.asarray(maps, dtype=np.float64)
    finite = np.isfinite(x)
    use = finite & covered[None]
    count = use.sum(axis=(1, 2))
    means = np.where(use, x, 0.0).sum(axis=(1, 2)) / np.maximum(count, 1)
    dev = np.where(use, x - means[:, None, None], 0.0)
    scales = np.abs(dev).max(axis=(1, 2), initial=0.0)
    dev /= np.where(scales > 0, scales, 1.0)[:, None, None]
    return dev, finite, means, scales


def _at_image_size(res: np.ndarray, n: int, size: tuple[int, int],
                   geometry: Geometry | None) -> tuple[np.ndarray, np.ndarray]:
    """`responses.at_input_size` of the first `n` maps of `res` `(h, w, outputs)`.

    Where `res` is C-contiguous, the maps are taken by one cached index
    (`responses.pixel_sources`): the same values at the covered pixels and the
    same memory layout as `at_input_size` leaves (that layout fixes the order
    in which `_centred` sums each tile, so the means stay exactly the same).
    """
    if not res.flags.c_contiguous:
        return at_input_size(res[..., :n], size, geometry)
    h, w, outputs = res.shape
    source, covered = pixel_sources((h, w, n), size, geometry)
    base = (h, w) if geometry is None else (geometry.input_size or size)
    if tuple(base) == tuple(size):
        if geometry is None:
            return res[..., :n], covered
        flat = res.reshape(-1, outputs)[:, :n].take(source, axis=0)
        return flat.reshape(size + (n,)), covered
    # Stretched: the second indexing step leaves the columns outermost in memory.
    across = source.reshape(size).T.reshape(-1)
    flat = res.reshape(-1, outputs)[:, :n].take(across, axis=0)
    return flat.reshape(size[1], size[0], n).transpose(1, 0, 2), covered


def response_grid(image: np.ndarray, responses: np.ndarray, max_tiles: int = 256,
                  geometry: Geometry | None = None) -> Grid:
    """One sample image followed by its response maps, each drawn at the image's size.

    The image (channels last) is drawn in grey (1 channel), in colour (3
    channels) or by its first channel, min-max scaled. Each response map is
    resampled onto the image's pixels (nearest neighbour around each output's
    receptive-field centre, `responses.at_input_size`), so a strided layer's
    tile is as large as the image and lies over the pixels it was computed
    from. Each tile has its own contrast: the map minus its mean, divided by
    its largest |deviation|, drawn with the diverging colour map (white at
    the tile's mean, full red/blue at mean ± scale). Pixels no output covers
    (the border `"valid"` padding leaves out) are `UNCOVERED_RGB`; NaN and
    Inf are `NONFINITE_RGB`.

    Args:
        image: `(H, W, C)`.
        responses: `(h, w, outputs)`: the layer's output size for an image of
            `(H, W)` under `geometry`.
        max_tiles: The most response tiles drawn. Defaults to 256.
        geometry: The layer's `responses.Geometry` (kernel size, strides,
            padding, dilation). Defaults to None: the maps are stretched to
            the image's size by nearest neighbour (exact for maps already at
            that size).

    Returns:
        A `Grid` whose first tile is `"image"`, then `("response", output)`;
        `means` and `scales` hold each response tile's mean and scale, and
        `vmax` is 1.0 (full colour is one tile scale from the tile's mean).
    """
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"the image must be (H, W, C). Received: image.shape={img.shape}")
    res = np.asarray(responses)
    if res.ndim != 3:
        raise ValueError(
            f"responses must be (h, w, outputs). Received: responses.shape={res.shape}"
        )
    n = min(res.shape[-1], max_tiles)
    size = (img.shape[0], img.shape[1])
    maps, covered = _at_image_size(res, n, size, geometry)
    t, finite, means, scales = _centred(np.moveaxis(maps, -1, 0), covered)
    codes = _colour_codes(t)
    nonfinite, uncovered = len(_colour_steps()[1]) - 2, len(_colour_steps()[1]) - 1
    if not finite.all():
        codes[~finite] = nonfinite
    if not covered.all():
        codes[:, ~covered] = uncovered
    count = len(codes) + 1
    cols = count if count <= MAX_COLUMNS else math.ceil(math.sqrt(count))
    tiles = np.empty((count,) + size + (3,), dtype=np.uint8)
    tiles[0] = intensity_rgb(img if img.shape[-1] == 3 else img[..., 0])
    _colour_steps()[1].take(codes, axis=0, out=tiles[1:])
    out, origins, scale = compose(tiles, cols)
    return Grid(out, _response_labels(len(codes)), origins, scale, 1.0, res.shape[-1] + 1,
                means=tuple(float(m) for m in means), scales=tuple(float(v) for v in scales))


@functools.lru_cache(maxsize=16)
def _response_labels(n: int) -> tuple:
    """A response grid's tiles: the image, then each output."""
    return ("image",) + tuple(("response", o) for o in range(n))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=1)
def _fast_deflate() -> Callable[[Any], bytes] | None:
    """ISA-L's zlib-format compression at `ISAL_PNG_LEVEL`, when `isal` is installed."""
    try:
        from isal import isal_zlib
    except ImportError:  # a platform without its wheels: zlib at PNG_LEVEL
        return None
    return functools.partial(isal_zlib.compress, level=ISAL_PNG_LEVEL)


def _deflate(data: Any, level: int | None) -> bytes:
    fast = _fast_deflate() if level is None else None
    if fast is not None:
        return fast(data)
    return zlib.compress(data, PNG_LEVEL if level is None else level)


def encode_png(img: np.ndarray, level: int | None = None) -> bytes:
    """Encode an 8-bit grey `(h, w)` or RGB `(h, w, 3)` image as PNG.

    `level`: a zlib compression level; None (the default) takes the fastest encoder
    installed (ISA-L at `ISAL_PNG_LEVEL`, else zlib at `PNG_LEVEL`).

    Example:

    >>> encode_png(np.zeros((2, 2, 3), np.uint8))[:8]
    b'\\x89PNG\\r\\n\\x1a\\n'
    """
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise TypeError(f"encode_png needs a uint8 image. Received: dtype={a.dtype}")
    if a.ndim == 2:
        colour = 0
        a = a[..., None]
    elif a.ndim == 3 and a.shape[2] == 3:
        colour = 2
    else:
        raise ValueError(f"encode_png needs (h, w) or (h, w, 3). Received: shape={a.shape}")
    h, w = a.shape[:2]
    if h < 1 or w < 1:
        raise ValueError(f"encode_png needs a non-empty image. Received: shape={a.shape}")
    rows = np.empty((h, 1 + a.shape[1] * a.shape[2]), dtype=np.uint8)
    rows[:, 0] = 0  # filter type: none
    rows[:, 1:].reshape(a.shape)[:] = a
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", _deflate(rows.data, level))
        + _chunk(b"IEND", b"")
    )


class DiffGrids(NamedTuple):
    """The kernel grids of one tensor in snapshot A, in snapshot B, and of B - A."""

    a: Grid
    b: Grid
    b_minus_a: Grid


def diff_grids(kernel_a: np.ndarray, kernel_b: np.ndarray, perm: np.ndarray | None = None,
               max_tiles: int = 256, perm_in: np.ndarray | None = None) -> DiffGrids:
    """Kernel grids of A, of B and of B - A, each on its own colour scale.

    Args:
        kernel_a: A's kernel (3 to 5 dimensions, output units last).
        kernel_b: B's kernel, of the same shape.
        perm: B's units in the order of A's (`perm[i]` = the unit of B matched
            to unit i of A), so tile i of B and of B - A shows the unit matched
            to A's tile i. Defaults to None: B as stored.
        max_tiles: The most tiles per grid. Defaults to 256.
        perm_in: B's inputs (the axis before the units) in the order of A's,
            likewise. Defaults to None: as stored.

    Returns:
        A `DiffGrids`.

    Example:

    >>> k = np.arange(2 * 2 * 1 * 3, dtype=float).reshape(2, 2, 1, 3)
    >>> g = diff_grids(k, k[..., ::-1], perm=np.array([2, 1, 0]))
    >>> bool(np.all(g.a.image == g.b.image))
    True
    """
    ka = np.asarray(kernel_a, dtype=np.float64)
    kb = np.asarray(kernel_b, dtype=np.float64)
    if perm is not None:
        kb = kb[..., np.asarray(perm)]
    if perm_in is not None:
        kb = kb[..., np.asarray(perm_in), :]
    return DiffGrids(kernel_grid(ka, max_tiles=max_tiles), kernel_grid(kb, max_tiles=max_tiles),
                     kernel_grid(kb - ka, max_tiles=max_tiles))
