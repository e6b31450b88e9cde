"""Fixed-bin histograms of weight tensors: pure numpy, safe with NaN, Inf and empty tensors."""

from __future__ import annotations

import numpy as np

from .scratch import scratch

# The bucket count tf.summary.histogram uses by default.
DEFAULT_BINS = 30
# Float32 values binned at a time, through reused buffers (about 3 MB in all); few Python
# steps per tensor, as in stats.CHUNK. Blocks of 1 << 18 took half the CPU of 1 << 15.
_BLOCK = 1 << 18
# Values of other dtypes binned at a time (2 MB float64 temporaries).
_BLOCK64 = 1 << 16
# A float32 value whose bucket, computed in float32, lies within `bins * _NEAR` of an edge is
# checked against the edges (the float32 error is below bins * 2**-22, 64 times less).
_NEAR = 2.0**-16
_MAX_FAST_BINS = 1 << 12
# The most packed keys `_Float32Binner` counts at once (a 512 KB count array).
_MAX_KEYS = 1 << 16


def histogram(values: np.ndarray, bins: int = DEFAULT_BINS) -> np.ndarray:
    """Histogram of the finite values of a tensor as `(left, right, count)` rows.

    The `bins` buckets split `[min, max]` of the finite values evenly (the
    last bucket includes `max`). Non-finite values are not binned (their
    counts are reported by `stats.tensor_stats` as `nan_count` and
    `inf_count`); the result is never empty, so TensorBoard always has
    something to draw:

    - all values equal `v`: the buckets split `[v - 0.5, v + 0.5]`, and the one
      holding `v` counts every value (ranges narrower than float64 can resolve
      into `bins` buckets are widened just enough);
    - no finite value (an empty tensor, or one of only NaN/Inf): the buckets
      split `[-0.5, 0.5]` with all counts 0.

    Args:
        values: Any numeric or boolean array (complex values are binned by
            magnitude).
        bins: The number of buckets (>= 1). Defaults to 30.

    Returns:
        A float64 array of shape `[bins, 3]`; the counts sum to the number of
        finite values.

    Example:

    >>> histogram(np.array([0.0, 1.0, np.nan]), bins=2)
    array([[0. , 0.5, 1. ],
           [0.5, 1. , 1. ]])
    """
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"`bins` must be an integer >= 1. Received: bins={bins!r}")
    x = np.asarray(values).reshape(-1)
    if x.dtype.kind == "c":
        x = np.abs(x)
    if x.dtype.kind != "f":
        x = x.astype(np.float64)  # bool and integers (a float array is binned as it is)
    if x.size:
        lo, hi = float(x.min()), float(x.max())  # NaN if there is one; Inf if there is one
        if not (np.isfinite(lo) and np.isfinite(hi)):
            x = x[np.isfinite(x)]
            if x.size:
                lo, hi = float(x.min()), float(x.max())
    scale = 1.0
    if x.size == 0:
        lo, hi = -0.5, 0.5
        counts = np.zeros(bins)
    else:
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        # Bins narrower than a few float64 steps cannot be told apart: widen them.
        min_width = 4.0 * bins * float(np.spacing(max(abs(lo), abs(hi))))
        if hi - lo < min_width:
            mid = lo / 2.0 + hi / 2.0
            lo, hi = mid - min_width / 2.0, mid + min_width / 2.0
        elif not np.isfinite(hi - lo):  # the span overflows float64: bin at half scale
            scale = 2.0
        if scale == 1.0:
            counts = _uniform_counts(x, lo, hi, bins).astype(np.float64)
        else:
            counts, _ = np.histogram(
                x.astype(np.float64) / scale, bins=bins, range=(lo / scale, hi / scale)
            )
            counts = counts.astype(np.float64)
    edges = np.linspace(lo / scale, hi / scale, bins + 1) * scale
    out = np.empty((bins, 3))
    out[:, 0] = edges[:-1]
    out[:, 1] = edges[1:]
    out[:, 2] = counts
    return out


def _uniform_counts(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    """Counts of the (finite, real) values of `x`, all in `[lo, hi]`, in `bins` equal buckets.

    Exactly `np.histogram(x.astype(np.float64), bins, range=(lo, hi))[0]`:
    the same float64 edges (`np.linspace`), bucket `i` holding
    `edges[i] <= v < edges[i + 1]` and the last one `hi` too, but without a
    float64 copy of the whole tensor and without the range filter (every
    value is known to be inside). Works block by block in cache-sized pieces.
    """
    edges = np.linspace(lo, hi, bins + 1)
    factor = bins / (hi - lo)
    counts = np.zeros(bins, dtype=np.int64)
    if x.dtype == np.float32:
        return _float32_counts(x, edges, lo, factor, counts)
    return _float64_counts(x, edges, lo, factor, counts)


def _float64_counts(x: np.ndarray, edges: np.ndarray, lo: float, factor: float,
                    counts: np.ndarray) -> np.ndarray:
    """`_uniform_counts` in float64, block by block."""
    last = counts.size - 1
    bins = counts.size
    for start in range(0, x.size, _BLOCK64):
        block = x[start : start + _BLOCK64]
        f = block.astype(np.float64)
        f -= lo
        f *= factor
        idx = f.astype(np.intp)  # the bucket, give or take one near an edge
        np.minimum(idx, last, out=idx)
        # Settle values within rounding of an edge by comparing with the edges themselves.
        idx -= block < edges[idx]
        idx += (block >= edges[idx + 1]) & (idx != last)
        counts += np.bincount(idx, minlength=bins)
    return counts


def _float32_counts(x: np.ndarray, edges: np.ndarray, lo: float, factor: float,
                    counts: np.ndarray) -> np.ndarray:
    """`_uniform_counts` of float32 values without converting them to float64.

    A float32 value `v` is below a float64 edge `e` exactly when it is below the
    smallest float32 not below `e`, so comparing with the edges rounded up to float32
    settles every bucket exactly. The bucket is first computed in float32, whose error
    (a few float32 roundings of a number below `bins`) is far below `_NEAR` of a bucket:
    only the values that land that close to an edge are compared with the edges; every
    other value is counted where it landed, several buckets to a counted key
    (`_Float32Binner`). Blocks go through reused buffers.
    """
    bins = counts.size
    up = edges.astype(np.float32)
    low = up.astype(np.float64) < edges
    up[low] = np.nextafter(up[low], np.float32(np.inf))
    with np.errstate(over="ignore"):  # a range of a few subnormals: its factor is no float32
        lo32, factor32 = np.float32(lo), np.float32(factor)
    if float(lo32) != lo or not np.isfinite(factor32) or bins > _MAX_FAST_BINS:
        return _float64_counts(x, edges, lo, factor, counts)  # the float32 guess may be far off
    binner = _Float32Binner(up, lo32, factor32, x.size)
    for start in range(0, x.size, _BLOCK):
        binner.add(x[start : start + _BLOCK])
    return counts + binner.counts()


class _Float32Binner:
    """The block loop of `_float32_counts`, with its reused buffers and running counts.

    Bincount costs most per value, so the buckets of `group` values (one from each of
    `group` equal slices of a block) are packed into one key, `b0 * base**2 + b1 * base
    + b2`, counted once; the counts of each bucket come back by summing the key counts
    over the other positions. `base = bins + 1`: a value at the top edge may land in
    bucket `bins`, which is folded into the last one at the end.
    """

    def __init__(self, up: np.ndarray, lo32: np.float32, factor32: np.float32, size: int):
        n = min(_BLOCK, size)
        self.up, self.lo32, self.factor32 = up, lo32, factor32
        self.bins = up.size - 1
        self.base = self.bins + 1
        keys = min(_MAX_KEYS, size // 8)  # a count array small next to the values
        self.group = next(g for g in (3, 2, 1) if self.base**g <= keys or g == 1)
        self.near = np.float32(0.5) - np.float32(self.bins * _NEAR)
        self.packed = np.zeros(self.base**self.group if self.group > 1 else 0, np.int64)
        self.direct = np.zeros(self.base, np.int64)  # counts not in `packed`
        self.pos = scratch("hist.pos", n, np.float32)
        self.whole = scratch("hist.whole", n, np.float32)
        self.edge = scratch("hist.edge", n, np.bool_)
        self.keys = scratch("hist.keys", n // self.group, np.float32)
        self.ikeys = scratch("hist.ikeys", n // self.group, np.intp)

    def add(self, block: np.ndarray) -> None:
        """Count one block of finite float32 values, all in `[lo, hi]`."""
        m = block.size
        f, fl, e = self.pos[:m], self.whole[:m], self.edge[:m]
        np.subtract(block, self.lo32, out=f)
        f *= self.factor32  # lo32 == lo <= min(x): f >= 0
        np.floor(f, out=fl)  # the bucket, give or take one near an edge
        f -= fl
        f -= np.float32(0.5)
        np.abs(f, out=f)
        np.greater(f, self.near, out=e)  # within _NEAR of a bucket's edge
        packed = self._add_packed(fl) if self.group > 1 else 0
        rest = fl[packed:]
        if rest.size:
            self.direct += np.bincount(rest.astype(np.intp), minlength=self.base)
        if e.any():
            self._settle(block, fl, np.flatnonzero(e))

    def _add_packed(self, fl: np.ndarray) -> int:
        """Count the buckets `fl` of the first `group * t` values as `t` keys; returns
        how many values were counted."""
        t = fl.size // self.group
        keys, ikeys, base = self.keys[:t], self.ikeys[:t], np.float32(self.base)
        np.multiply(fl[:t], base, out=keys)  # small whole numbers: exact in float32
        keys += fl[t : 2 * t]
        if self.group == 3:
            keys *= base
            keys += fl[2 * t : 3 * t]
        np.copyto(ikeys, keys, casting="unsafe")
        self.packed += np.bincount(ikeys, minlength=self.packed.size)
        return self.group * t

    def _settle(self, block: np.ndarray, fl: np.ndarray, where: np.ndarray) -> None:
        """Move the values near an edge from the bucket they landed in to their own,
        found by comparing them with the edges rounded up to float32."""
        last, up = self.bins - 1, self.up
        v, landed = block[where], fl[where].astype(np.intp)
        guess = np.minimum(landed, last)
        exact = guess - (v < up[guess])
        exact += (v >= up[exact + 1]) & (exact != last)
        self.direct -= np.bincount(landed, minlength=self.base)
        self.direct += np.bincount(exact, minlength=self.base)

    def counts(self) -> np.ndarray:
        """The counts of the `bins` buckets of every value added."""
        total = self.direct.copy()
        if self.group > 1:
            cube = self.packed.reshape((self.base,) * self.group)
            axes = range(self.group)
            for axis in axes:
                total += cube.sum(axis=tuple(a for a in axes if a != axis))
        out = total[: self.bins]
        out[-1] += total[self.bins]
        return out
