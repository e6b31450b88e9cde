"""Fixed-bin histograms of weight tensors: pure numpy, safe with NaN, Inf and empty tensors."""

from __future__ import annotations

import numpy as np

# The bucket count tf.summary.histogram uses by default.
DEFAULT_BINS = 30


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
    x = x.astype(np.float64)
    x = x[np.isfinite(x)]
    scale = 1.0
    if x.size == 0:
        lo, hi = -0.5, 0.5
        counts = np.zeros(bins)
    else:
        lo, hi = float(x.min()), float(x.max())
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        # Bins narrower than a few float64 steps cannot be told apart: widen them.
        min_width = 4.0 * bins * float(np.spacing(max(abs(lo), abs(hi))))
        if hi - lo < min_width:
            mid = lo / 2.0 + hi / 2.0
            lo, hi = mid - min_width / 2.0, mid + min_width / 2.0
        elif not np.isfinite(hi - lo):  # the span overflows float64: bin at half scale
            scale = 2.0
        counts, _ = np.histogram(x / scale, bins=bins, range=(lo / scale, hi / scale))
        counts = counts.astype(np.float64)
    edges = np.linspace(lo / scale, hi / scale, bins + 1) * scale
    out = np.empty((bins, 3))
    out[:, 0] = edges[:-1]
    out[:, 1] = edges[1:]
    out[:, 2] = counts
    return out
