"""Fixed-bin histograms of weight tensors: pure numpy, safe with NaN, Inf and empty tensors."""

from __future__ import annotations

import numpy as np

from .scratch import scratch

# The bucket count tf.summary.histogram uses by default.
DEFAULT_BINS = 30
# Values binned at a time (2 MB float64 temporaries, or reused float32 buffers that stay in
# cache; few Python steps per tensor, as in stats.CHUNK).
_BLOCK = 1 << 16
# A float32 value whose bucket, computed in float32, lies within `bins * _NEAR` of an edge is
# checked against the edges (the float32 error is below bins * 2**-22, 64 times less).
_NEAR = 2.0**-16
_MAX_FAST_BINS = 1 << 12


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
    for start in range(0, x.size, _BLOCK):
        block = x[start : start + _BLOCK]
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
    other value is counted where it landed. Blocks go through reused buffers.
    """
    bins = counts.size
    last = bins - 1
    up = edges.astype(np.float32)
    low = up.astype(np.float64) < edges
    up[low] = np.nextafter(up[low], np.float32(np.inf))
    lo32, factor32 = np.float32(lo), np.float32(factor)
    if float(lo32) != lo or not np.isfinite(factor32) or bins > _MAX_FAST_BINS:
        return _float64_counts(x, edges, lo, factor, counts)  # the float32 guess may be far off
    near = np.float32(0.5) - np.float32(bins * _NEAR)
    n = min(_BLOCK, x.size)
    pos, whole = scratch("hist.pos", n, np.float32), scratch("hist.whole", n, np.float32)
    idx, edge = scratch("hist.idx", n, np.intp), scratch("hist.edge", n, np.bool_)
    for start in range(0, x.size, _BLOCK):
        block = x[start : start + _BLOCK]
        m = block.size
        f, fl, i, e = pos[:m], whole[:m], idx[:m], edge[:m]
        np.subtract(block, lo32, out=f)
        f *= factor32  # lo32 == lo <= min(x): f >= 0
        np.floor(f, out=fl)
        f -= fl
        f -= np.float32(0.5)
        np.abs(f, out=f)
        np.greater(f, near, out=e)  # within _NEAR of a bucket's edge
        np.minimum(fl, np.float32(last), out=fl)
        np.copyto(i, fl, casting="unsafe")
        counts += np.bincount(i, minlength=bins)
        if e.any():
            where = np.flatnonzero(e)
            v, guess = block[where], i[where]
            exact = guess - (v < up[guess])
            exact += (v >= up[exact + 1]) & (exact != last)
            counts -= np.bincount(guess, minlength=bins)
            counts += np.bincount(exact, minlength=bins)
    return counts
