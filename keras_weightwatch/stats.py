"""Per-tensor statistics: pure numpy, one pass, bounded memory.

Statistics of non-finite data are computed over the finite values, and the
NaN and Inf counts are reported beside them, so one NaN does not hide what
the rest of the tensor is doing while the count still flags it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import numpy as np

from .reductions import pair_sums
from .reductions import sumsq as _sumsq
from .scratch import scratch

# Work on at most this many elements at a time, so a float32 tensor is never copied to
# float64 whole (8 MB temporaries). Larger chunks mean fewer Python steps holding the GIL
# between numpy calls, which the training thread would wait for: measured with
# benchmarks/bench_overhead.py, 1 << 20 added 57-73 ms per epoch where 1 << 16 added 86-110
# (with a new float64 copy per chunk). Chunks now go through two reused float64 buffers that
# stay in cache: 1 << 18 halved the CPU of 1 << 20 with fresh copies.
CHUNK = 1 << 18

STAT_NAMES = ("l2_norm", "mean", "std", "max_abs", "nan_count", "inf_count", "update_ratio")

# Dtypes whose own min/max show NaN and Inf as float64 would: no float64 copy to check them.
_NATIVE = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64))


def _as_float(x: np.ndarray, buf: np.ndarray | None = None) -> np.ndarray:
    """The values as float64 (complex ones by magnitude), in `buf` when one is given."""
    if x.dtype.kind == "c":
        return np.abs(x).astype(np.float64)
    if buf is None:
        return x.astype(np.float64)
    if x.dtype == np.float64 and x.flags.c_contiguous:
        return x  # read as it is: nothing here writes to it
    out = buf[: x.size]
    np.copyto(out, x, casting="unsafe")
    return out


def _range(x: np.ndarray, f: np.ndarray) -> tuple[float, float]:
    """max and min of a chunk (NaN if it holds one), from the narrower of `x` and its
    float64 values `f`."""
    src = x if x.dtype in _NATIVE or x.dtype.kind in "iub" else f
    return float(src.max()), float(src.min())


class _Sums:
    """The running sums of `tensor_stats`, over finite values, chunk by chunk."""

    def __init__(self) -> None:
        self.n_finite = 0
        self.total = 0.0
        self.sumsq = 0.0
        self.max_abs = -math.inf
        self.nan = 0
        self.inf = 0
        self.diff_sq = 0.0
        self.prev_sq = 0.0

    def add(self, x: np.ndarray, hi: float, lo: float) -> None:
        """Add a float64 chunk whose max and min are `hi` and `lo` (it is not changed)."""
        if math.isfinite(hi) and math.isfinite(lo):  # no NaN (it would show) and no Inf
            self.n_finite += x.size
            self.total += float(x.sum())
            self.sumsq += _sumsq(x)
            self.max_abs = max(self.max_abs, hi, -lo)
            return
        finite = np.isfinite(x)
        n_nan = int(np.count_nonzero(np.isnan(x)))
        self.nan += n_nan
        self.inf += int(x.size - np.count_nonzero(finite) - n_nan)
        x = x[finite]
        if x.size:
            self.n_finite += x.size
            self.total += float(x.sum())
            self.sumsq += _sumsq(x)
            self.max_abs = max(self.max_abs, float(np.abs(x).max()))

    def add_update(self, x: np.ndarray, prev: np.ndarray, buf: np.ndarray) -> None:
        """Add the update ratio's sums of a float64 chunk `x` and the same chunk of the
        previous tensor (float64 values, which may be `buf`); `buf` gets x - prev."""
        self.prev_sq += _sumsq(prev)
        self.diff_sq += _sumsq(np.subtract(x, prev, out=buf[: x.size]))


def tensor_stats(arr: np.ndarray, prev: np.ndarray | None = None) -> dict[str, float]:
    """Statistics of one weight tensor.

    Args:
        arr: The tensor (any numeric or boolean dtype, any shape, may be empty).
        prev: The same tensor at the previous snapshot, for `update_ratio`.

    Returns:
        A dict with `l2_norm`, `mean`, `std`, `max_abs` (over finite values;
        NaN when there is none), `nan_count`, `inf_count`, `size`, and, when
        `prev` is given with the same shape, `update_ratio` =
        ||arr - prev|| / ||prev|| (NaN when ||prev|| is 0 and arr changed, 0
        when nothing changed).

    Example:

    >>> s = tensor_stats(np.array([3.0, 4.0]))
    >>> s["l2_norm"], s["mean"], s["max_abs"]
    (5.0, 3.5, 4.0)
    """
    a = np.asarray(arr)
    flat = a.reshape(-1)
    pflat = None
    if prev is not None and np.shape(prev) == a.shape:
        pflat = np.asarray(prev).reshape(-1)
    sums = _Sums()
    n = min(CHUNK, flat.size)
    buf = scratch("stats.x", n) if a.dtype.kind != "c" else None  # reused: stays in cache
    pbuf = scratch("stats.prev", n) if pflat is not None else None
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite sums are handled below
        for start in range(0, flat.size, CHUNK):
            chunk = flat[start : start + CHUNK]
            x = _as_float(chunk, buf)
            if pflat is not None and pbuf is not None:  # the update ratio, in the same pass
                sums.add_update(x, _as_float(pflat[start : start + CHUNK], pbuf), pbuf)
            sums.add(x, *_range(chunk, x))
    n_finite, total, sumsq, max_abs = sums.n_finite, sums.total, sums.sumsq, sums.max_abs
    nan, inf, diff_sq, prev_sq = sums.nan, sums.inf, sums.diff_sq, sums.prev_sq
    if n_finite:
        mean = total / n_finite
        var = max(sumsq / n_finite - mean * mean, 0.0)
        out = {
            "l2_norm": math.sqrt(sumsq),
            "mean": mean,
            "std": math.sqrt(var),
            "max_abs": max_abs,
        }
    else:
        out = {"l2_norm": math.nan, "mean": math.nan, "std": math.nan, "max_abs": math.nan}
    out["nan_count"] = float(nan)
    out["inf_count"] = float(inf)
    out["size"] = float(a.size)
    if pflat is not None:
        out["update_ratio"] = _ratio(diff_sq, prev_sq)
    return out


def same_stats(arr: np.ndarray, prev: np.ndarray | None,
               prev_stats: dict[str, float] | None) -> dict[str, float] | None:
    """What `tensor_stats(arr, prev)` returns, without its pass over the values, when `arr`
    holds the bytes of `prev` (a frozen tensor) and `prev_stats` are `prev`'s own statistics
    (`tensor_stats(prev, ...)`): those, with `update_ratio` 0. None otherwise, and for
    values that are not all finite (whose update ratio is NaN), so the caller computes them.

    The bytes are compared a chunk at a time from the start: a tensor that trained differs
    within its first chunk, so this costs it almost nothing.
    """
    if (prev is None or prev_stats is None or np.shape(prev) != np.shape(arr)
            or np.asarray(prev).dtype != np.asarray(arr).dtype
            or prev_stats.get("nan_count") != 0.0 or prev_stats.get("inf_count") != 0.0
            or not math.isfinite(prev_stats.get("l2_norm", math.nan))
            or not _same_bytes(np.asarray(arr), np.asarray(prev))):
        return None
    out = {k: v for k, v in prev_stats.items() if k in STAT_NAMES or k == "size"}
    out["update_ratio"] = 0.0
    return out


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    if not (a.flags.c_contiguous and b.flags.c_contiguous):
        return False  # the statistics are computed (the buffers a snapshot holds are not)
    x, y = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    whole = x.size - x.size % 8
    if not np.array_equal(x[whole:], y[whole:]):
        return False
    x, y = x[:whole].view(np.uint64), y[:whole].view(np.uint64)
    step = CHUNK // 8  # 256 KB, then 2 MB at a time
    for start, stop in [(0, step), *((i, i + 8 * step) for i in range(step, x.size, 8 * step))]:
        if not np.array_equal(x[start:stop], y[start:stop]):
            return False
    return True


def update_ratio(arr: np.ndarray, prev: np.ndarray) -> float:
    """||arr - prev|| / ||prev||, in float64, chunk by chunk (`reductions.pair_sums`).

    Returns 0.0 when the two are equal (frozen weights), NaN when `prev` is all
    zeros but `arr` is not, or when either holds non-finite values. Complex
    values count by their magnitude, as in `tensor_stats`.
    """
    s = pair_sums(_column(prev), _column(arr))  # A = prev, B = arr
    return _ratio(s.sdd, s.saa)


def _column(x: np.ndarray) -> np.ndarray:
    a = np.asarray(x)
    return (np.abs(a) if a.dtype.kind == "c" else a).reshape(-1, 1)


def _ratio(diff_sq: float, prev_sq: float) -> float:
    if not (math.isfinite(diff_sq) and math.isfinite(prev_sq)):
        return math.nan
    if diff_sq == 0.0:
        return 0.0
    if prev_sq == 0.0:
        return math.nan
    return math.sqrt(diff_sq) / math.sqrt(prev_sq)


# ------------------------------------------------------------ statistics combined from parts


@dataclasses.dataclass(frozen=True)
class Partial:
    """Sums over one part of a tensor (a shard) from which the whole tensor's statistics
    combine (`combine`, then `finish`), without ever holding the whole tensor.

    The variance travels as the mean and the sum of squared deviations from it (`m2`),
    merged with Chan et al.'s parallel formula, so no sum of squares is subtracted from
    another (no cancellation when the mean is large next to the spread).

    Attributes:
        size: Elements of the part.
        count: Its finite elements.
        mean: Their mean (0.0 when there is none).
        m2: Their sum of squared deviations from `mean`.
        sumsq: Their sum of squares (for `l2_norm`).
        max_abs: Their largest magnitude (-inf when there is none).
        nan: NaN elements.
        inf: Infinite elements.
        diff_sq: Sum of (x - prev)^2 over the part against the same part at the previous
            snapshot (None: no previous part, so no `update_ratio`).
        prev_sq: Sum of prev^2 over the previous part (None with `diff_sq`).
    """

    size: int
    count: int
    mean: float
    m2: float
    sumsq: float
    max_abs: float
    nan: int
    inf: int
    diff_sq: float | None = None
    prev_sq: float | None = None


EMPTY = Partial(size=0, count=0, mean=0.0, m2=0.0, sumsq=0.0, max_abs=-math.inf, nan=0, inf=0,
                diff_sq=0.0, prev_sq=0.0)
"""The identity of `merge`: no elements (and a previous part of none)."""


def _finite_partial(x: np.ndarray) -> Partial:
    """The sums of a 1-d float64 array of finite values (it is overwritten)."""
    n = int(x.size)
    if n == 0:
        return dataclasses.replace(EMPTY, diff_sq=None, prev_sq=None)
    sumsq = _sumsq(x)
    hi, lo = float(x.max()), float(x.min())
    mean = float(x.sum()) / n
    np.subtract(x, mean, out=x)  # two passes within the chunk: m2 from the deviations
    return Partial(size=n, count=n, mean=mean, m2=_sumsq(x), sumsq=sumsq,
                   max_abs=max(hi, -lo), nan=0, inf=0)


def _chunk_partial(x: np.ndarray) -> Partial:
    """The sums of one chunk (1-d float64, overwritten), its non-finite values counted."""
    finite = np.isfinite(x)
    if bool(finite.all()):
        return _finite_partial(x)
    n_nan = int(np.count_nonzero(np.isnan(x)))
    n_inf = int(x.size - np.count_nonzero(finite) - n_nan)
    return dataclasses.replace(_finite_partial(x[finite]), size=int(x.size), nan=n_nan,
                               inf=n_inf)


def partial_stats(arr: np.ndarray, prev: np.ndarray | None = None) -> Partial:
    """The sums of one part of a tensor, chunk by chunk (at most `CHUNK` float64 values).

    Args:
        arr: The part (any numeric or boolean dtype, any shape, may be empty).
        prev: The same part at the previous snapshot (ignored unless of the same shape).
    """
    a = np.asarray(arr)
    flat = a.reshape(-1)
    pflat = None
    if prev is not None and np.shape(prev) == a.shape:
        pflat = np.asarray(prev).reshape(-1)
    out = EMPTY
    for start in range(0, flat.size, CHUNK):
        x = _as_float(flat[start : start + CHUNK])  # a copy of its own, overwritten below
        diff_sq = prev_sq = None
        if pflat is not None:  # the update ratio's sums first, while x is intact
            p = _as_float(pflat[start : start + CHUNK])
            prev_sq = _sumsq(p)
            np.subtract(x, p, out=p)
            diff_sq = _sumsq(p)
        part = dataclasses.replace(_chunk_partial(x), diff_sq=diff_sq, prev_sq=prev_sq)
        out = merge(out, part)
    if pflat is None:
        out = dataclasses.replace(out, diff_sq=None, prev_sq=None)
    return out


def _sum_or_none(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def merge(a: Partial, b: Partial) -> Partial:
    """The sums of two disjoint parts together (Chan et al.'s update of mean and m2)."""
    n = a.count + b.count
    if n == 0:
        mean, m2 = 0.0, 0.0
    else:
        delta = b.mean - a.mean
        mean = a.mean + delta * (b.count / n)
        m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / n)
    return Partial(size=a.size + b.size, count=n, mean=mean, m2=m2, sumsq=a.sumsq + b.sumsq,
                   max_abs=max(a.max_abs, b.max_abs), nan=a.nan + b.nan, inf=a.inf + b.inf,
                   diff_sq=_sum_or_none(a.diff_sq, b.diff_sq),
                   prev_sq=_sum_or_none(a.prev_sq, b.prev_sq))


def combine(parts: Iterable[Partial]) -> Partial:
    """The sums of a tensor from those of parts that tile it (in any order).

    `update_ratio` survives only when every part had its previous part.
    """
    out = EMPTY
    for part in parts:
        out = merge(out, part)
    return out


def finish(p: Partial) -> dict[str, float]:
    """The statistics of `tensor_stats` (same names, same conventions) from a tensor's sums."""
    if p.count:
        out = {"l2_norm": math.sqrt(p.sumsq), "mean": p.mean,
               "std": math.sqrt(max(p.m2, 0.0) / p.count), "max_abs": p.max_abs}
    else:
        out = {"l2_norm": math.nan, "mean": math.nan, "std": math.nan, "max_abs": math.nan}
    out["nan_count"] = float(p.nan)
    out["inf_count"] = float(p.inf)
    out["size"] = float(p.size)
    if p.diff_sq is not None and p.prev_sq is not None:
        out["update_ratio"] = _ratio(p.diff_sq, p.prev_sq)
    return out
