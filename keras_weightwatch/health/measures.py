"""Per-unit reductions the health rules read: pure numpy, one or two passes per kernel.

A *unit* is an output unit of a Dense or convolution kernel: a slice along the kernel's last
axis (a Dense kernel's column, a convolution's output channel). Its incoming weights are
that slice. Computed on the worker from the effective snapshot (what the layer computes
with) and stored beside each kernel's statistics, so `weightwatch doctor` reads them back;
for runs written before they were stored, `doctor` computes them from the stored tensors
with the same functions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

UNITS = "units"
UNITS_COLLAPSED = "units_collapsed"
UNITS_DUPLICATE = "units_duplicate"
GRAD_DEAD_UNITS = "grad_dead_units"
UNIT_STAT_NAMES = (UNITS, UNITS_COLLAPSED, UNITS_DUPLICATE)
COLLAPSED_BELOW = 1e-3
"""A unit's incoming weights have collapsed when their norm is at most this fraction of the
layer's median unit norm (or exactly 0 when the median is 0)."""
_KERNEL_NAMES = ("kernel", "_kernel")


def is_unit_kernel(key: str, shape: tuple[int, ...]) -> bool:
    """Whether `key` is a Dense or convolution kernel with at least two output units: its
    last name is `kernel` and it has 2 to 5 axes (the spectral view's rule)."""
    return (key.rpartition("/")[2] in _KERNEL_NAMES and 2 <= len(shape) <= 5
            and shape[-1] >= 2 and int(np.prod(shape[:-1])) >= 1)


def _columns(kernel: np.ndarray) -> np.ndarray:
    """The kernel as (incoming weights, units), float32 or float64, without a copy where
    it already is one of them."""
    w = np.asarray(kernel)
    w = w.reshape(-1, w.shape[-1])
    if w.dtype not in (np.float32, np.float64):
        w = w.astype(np.float32)
    return w


def unit_measures(kernel: np.ndarray) -> dict[str, float]:
    """`units`, `units_collapsed` (incoming weights of norm at most `COLLAPSED_BELOW` x the
    median unit's) and `units_duplicate` (units whose incoming weights equal, bit for bit,
    those of another unit of the layer: a symmetry the initialisation did not break).

    Example:

    >>> k = np.array([[1.0, 1.0, 0.0, 2.0], [2.0, 2.0, 0.0, 1.0]])
    >>> unit_measures(k)
    {'units': 4.0, 'units_collapsed': 1.0, 'units_duplicate': 2.0}
    """
    w = _columns(kernel)
    sq = np.einsum("ij,ij->j", w, w)  # the one pass over the kernel: squared unit norms
    finite = np.isfinite(sq)  # a column holding NaN or Inf (or too large to square) is not
    med = float(np.median(sq[finite])) if finite.any() else 0.0  # the median norm, squared
    if med > 0:
        collapsed = int(np.count_nonzero(finite & (sq <= COLLAPSED_BELOW**2 * med)))
    else:
        collapsed = int(np.count_nonzero(finite & (sq == 0)))
    return {UNITS: float(w.shape[1]), UNITS_COLLAPSED: float(collapsed),
            UNITS_DUPLICATE: float(duplicate_units(w, sq))}


def duplicate_units(w: np.ndarray, sums: np.ndarray | None = None) -> int:
    """How many columns of `w` equal another column exactly (finite ones only). Columns are
    grouped by a per-column reduction (`sums`, by default their sums: numpy reduces the rows
    in order, the same for every column, so equal columns give equal values), then each
    group is compared element by element."""
    if sums is None:
        sums = w.sum(axis=0)
    ok = np.isfinite(sums)
    idx = np.flatnonzero(ok)
    if idx.size < 2:
        return 0
    order = idx[np.argsort(sums[idx], kind="stable")]
    s = sums[order]
    same = s[1:] == s[:-1]
    if not same.any():
        return 0  # every unit's reduction differs: no two units are equal (the usual case)
    starts = np.flatnonzero(np.r_[True, ~same])
    ends = np.r_[starts[1:], s.size]
    count = 0
    for a, b in zip(starts, ends):
        if b - a > 1:
            count += _equal_members(w, order[a:b])
    return count


def _equal_members(w: np.ndarray, cols: np.ndarray) -> int:
    """How many of the columns `cols` (equal sums) equal another one of them: first by three
    of their rows (units that differ there are not equal: a large kernel's float32 norms
    collide by chance, and this settles those without reading the columns), then whole."""
    rows = np.unique([0, w.shape[0] // 2, w.shape[0] - 1])
    probe = np.ascontiguousarray(w[rows][:, cols].T)
    _, inverse, counts = np.unique(probe, axis=0, return_inverse=True, return_counts=True)
    cols = cols[counts[np.ravel(inverse)] > 1]
    if cols.size < 2:
        return 0
    block = np.ascontiguousarray(w[:, cols].T)
    _, inverse, counts = np.unique(block, axis=0, return_inverse=True, return_counts=True)
    return int(np.sum(counts[np.ravel(inverse)] > 1))


def dead_units(grad: np.ndarray) -> int:
    """Output units whose gradient is exactly zero everywhere (their incoming weights get
    no signal on the probe batch: a ReLU that is off for every sample)."""
    g = np.asarray(grad).reshape(-1, np.shape(grad)[-1])
    return int(np.count_nonzero(~np.any(g != 0, axis=0)))


def snapshot_unit_measures(arrays: Mapping[str, np.ndarray],
                           keys: Iterable[str]) -> dict[str, dict[str, float]]:
    """`unit_measures` of each of `keys` that `arrays` holds."""
    return {k: unit_measures(arrays[k]) for k in keys if k in arrays}
