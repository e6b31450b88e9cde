"""Chunked float64 reductions of a pair of tensors: pure numpy, bounded memory.

`pair_sums(a2, b2)` reduces two (rows, units) arrays, possibly memory-mapped, a
block of rows at a time, accumulating in float64: the sums of squares of A, B
and B - A, the dot product <A, B> and max |B - A|, with the count of NaN/Inf
values when there are any; `pair_sums_gram` adds the units x units Gram matrix
Aᵀ B that a matching of units needs, `sums_per_unit` each unit's norms and dot
product (a matching's exact check). It never copies a whole tensor, so
comparing tensors of any size holds a few chunks at a time. `diff_runs`,
`drift` and `stats.update_ratio` all reduce through it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np

CHUNK_ELEMENTS = 1 << 20
"""Elements per chunk of the float64 reductions (8 MiB per operand)."""


# Sums of squares go through BLAS dot products of rows this long: OpenBLAS keeps a dot
# product of at most 10000 elements on the calling thread, so a reduction never wakes BLAS
# threads that would compete with training for the cores. Per element this is about three
# times faster than `np.einsum` on float64 (and it sums in more, shorter, runs).
_ROW = 4096
_vecdot = getattr(np, "vecdot", None)  # numpy >= 2.0


def sumsq(x: np.ndarray) -> float:
    """The sum of squares of a 1-d float64 array, in float64 (NaN/Inf propagate quietly)."""
    n = x.size - x.size % _ROW
    tail = x[n:]
    out = float(np.dot(tail, tail))
    if n:
        rows = x[:n].reshape(-1, _ROW)
        if _vecdot is None:
            return out + float(np.einsum("ij,ij->", rows, rows))
        out += float(_vecdot(rows, rows).sum())
    return out


def dot(x: np.ndarray, y: np.ndarray) -> float:
    """<x, y> of two 1-d float64 arrays (einsum, as `sumsq`)."""
    return float(np.einsum("i,i->", x, y))


def as_2d(arr: np.ndarray) -> np.ndarray:
    """The tensor as (rows, last axis); complex values as their real and imaginary parts."""
    if arr.dtype.kind == "c":
        flat = np.ascontiguousarray(arr).reshape(-1)
        return flat.view(flat.real.dtype).reshape(-1, 1)
    if arr.ndim == 0:
        return arr.reshape(1, 1)
    if arr.ndim == 1:
        return arr.reshape(-1, 1)
    return arr.reshape(-1, arr.shape[-1])


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _rows_per_chunk(units: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(units, 1))


@dataclasses.dataclass
class Sums:
    """Float64 accumulators of one tensor pair (A, B)."""

    saa: float = 0.0
    sbb: float = 0.0
    sab: float = 0.0
    sdd: float = 0.0
    maxd: float = 0.0
    size: int = 0
    nonfinite_a: int = 0
    nonfinite_b: int = 0

    def add(self, other: Sums) -> None:
        self.saa += other.saa
        self.sbb += other.sbb
        self.sab += other.sab
        self.sdd += other.sdd
        self.maxd = float(np.maximum(self.maxd, other.maxd))  # NaN wins
        self.size += other.size
        self.nonfinite_a += other.nonfinite_a
        self.nonfinite_b += other.nonfinite_b

    def rel_l2(self) -> float:
        """||B - A|| / ||A||: 0 when both are zero, inf when only A is."""
        if self.saa > 0:
            return math.sqrt(self.sdd) / math.sqrt(self.saa)
        if math.isnan(self.saa) or math.isnan(self.sdd):
            return math.nan
        return 0.0 if self.sdd == 0 else math.inf

    def cosine(self) -> float:
        """<A, B> / (||A|| ||B||): 1 when both are zero, 0 when one is."""
        if math.isnan(self.saa) or math.isnan(self.sbb) or math.isnan(self.sab):
            return math.nan
        if self.saa > 0 and self.sbb > 0:
            if self.saa == self.sbb:
                c = self.sab / self.saa  # exact for a tensor compared with itself
            else:
                c = self.sab / (math.sqrt(self.saa) * math.sqrt(self.sbb))
            return min(1.0, max(-1.0, c))
        return 1.0 if self.saa == 0 and self.sbb == 0 else 0.0

    def rms(self) -> float:
        return math.sqrt(self.sdd / self.size) if self.size else 0.0


class Gram(NamedTuple):
    """The units' products of a tensor pair: Aᵀ B and the squared norms of each unit."""

    g: np.ndarray
    """units x units, float64 (accumulated from float32 products)."""
    norms_a: np.ndarray
    norms_b: np.ndarray


def pair_sums(
    a2: np.ndarray,
    b2: np.ndarray,
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
) -> Sums:
    """Reduce a pair of (rows, units) arrays in chunks into their `Sums`.

    `rows` and `cols` reorder B (rows: its inputs, cols: its units) chunk by
    chunk, so B is never copied whole. NaN/Inf arithmetic stays quiet: it yields
    NaN/Inf results, and the non-finite values are counted.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        return _reduce(a2, b2, rows, cols, None)


def pair_sums_gram(
    a2: np.ndarray, b2: np.ndarray, rows: np.ndarray | None = None
) -> tuple[Sums, Gram]:
    """`pair_sums`, and in the same pass the units' `Gram` of A and (reordered) B."""
    gram = _new_gram(a2.shape[1])
    with np.errstate(invalid="ignore", over="ignore"):
        return _reduce(a2, b2, rows, None, gram), gram


def sums_and_gram(
    a2: np.ndarray, b2: np.ndarray, gram_rows: np.ndarray | None = None, block: int = 1
) -> tuple[Sums, Gram]:
    """The `Sums` of A and B as stored, and in the same pass the `Gram` of A and B[gram_rows].

    `gram_rows` reorders B's rows within consecutive blocks of `block` rows (the
    order `matching.input_rows` gives a kernel whose inputs are carried), so each
    chunk of B is read once, as stored, and reordered in memory for the Gram.
    """
    gram = _new_gram(a2.shape[1])
    with np.errstate(invalid="ignore", over="ignore"):
        return _reduce(a2, b2, None, None, gram, gram_rows, block), gram


def _new_gram(units: int) -> Gram:
    return Gram(np.zeros((units, units)), np.zeros(units), np.zeros(units))


class PerUnit(NamedTuple):
    """Float64 sums of each unit (column) of a tensor pair."""

    norms_a: np.ndarray
    """The squared norm of each unit of A."""
    norms_b: np.ndarray
    """The squared norm of each unit of B (as reordered)."""
    dots: np.ndarray
    """<A[:, i], B[:, i]> of each unit (B as reordered)."""


def _new_per_unit(units: int) -> PerUnit:
    return PerUnit(np.zeros(units), np.zeros(units), np.zeros(units))


def sums_per_unit(
    a2: np.ndarray, b2: np.ndarray, rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
) -> tuple[Sums, PerUnit]:
    """`pair_sums`, and in the same pass the float64 norms and dot product of each unit
    (B's rows and units reordered by `rows` and `cols`, as `pair_sums` reorders them)."""
    acc = _new_per_unit(a2.shape[1] if cols is None else len(cols))
    with np.errstate(invalid="ignore", over="ignore"):
        return _reduce(a2, b2, rows, cols, None, per_unit=acc), acc


def gram_rows_step(units: int, block: int = 1) -> int:
    """Rows of one chunk (and of one Gram product): whole blocks of about a chunk."""
    step = _rows_per_chunk(units)
    return max(block, step // block * block) if block > 1 else step


def _reduce(
    a2: np.ndarray, b2: np.ndarray, rows: np.ndarray | None, cols: np.ndarray | None,
    gram: Gram | None, gram_rows: np.ndarray | None = None, block: int = 1,
    per_unit: PerUnit | None = None,
) -> Sums:
    n_rows, units = a2.shape
    step = gram_rows_step(units, block)  # whole blocks, so `gram_rows` stays in each chunk
    s = Sums(size=int(a2.size))
    maxd = 0.0
    # Three float64 buffers of one chunk, reused: fresh pages for every chunk cost more
    # to fault in than the arithmetic itself.
    bufs = np.empty((3, min(n_rows, step) * units))
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        raw_a = a2[r0:r1]
        raw_b = b2[r0:r1] if rows is None else b2[rows[r0:r1]]
        raw_b = raw_b if cols is None else raw_b[:, cols]
        size = (r1 - r0) * units
        ca, cb = bufs[0, :size].reshape(r1 - r0, units), bufs[1, :size].reshape(r1 - r0, units)
        np.copyto(ca, raw_a, casting="unsafe")
        np.copyto(cb, raw_b, casting="unsafe")
        fa, fb = ca.reshape(-1), cb.reshape(-1)
        d = np.subtract(fb, fa, out=bufs[2, :size])
        if per_unit is None:
            s.saa += sumsq(fa)
            s.sbb += sumsq(fb)
            s.sab += dot(fa, fb)
        else:  # the totals from each unit's sums: the chunk is read three times, not six
            s.saa += _add_per_unit(per_unit.norms_a, ca, ca)
            s.sbb += _add_per_unit(per_unit.norms_b, cb, cb)
            s.sab += _add_per_unit(per_unit.dots, ca, cb)
        s.sdd += sumsq(d)
        finite = True
        if d.size:
            maxd = float(np.maximum(maxd, np.max(np.abs(d, out=d))))  # NaN wins
            finite = math.isfinite(maxd) and math.isfinite(s.saa + s.sbb)
            if not finite:
                s.nonfinite_a += int(fa.size - np.count_nonzero(np.isfinite(fa)))
                s.nonfinite_b += int(fb.size - np.count_nonzero(np.isfinite(fb)))
        if gram is not None:
            local = None if gram_rows is None else gram_rows[r0:r1] - r0
            _add_gram(gram, raw_a, raw_b if local is None else raw_b[local], ca, cb, finite)
    s.maxd = maxd
    return s


def _add_per_unit(acc: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """Add each unit's <x[:, j], y[:, j]> to `acc`; returns their sum."""
    part = np.einsum("ij,ij->j", x, y)
    acc += part
    return float(part.sum())


def _add_gram(g: Gram, raw_a: np.ndarray, raw_b: np.ndarray, ca: np.ndarray, cb: np.ndarray,
              finite: bool) -> None:
    """Add one chunk's products: Aᵀ B in float32 from the stored values (ample to rank
    units; the matched sums are exact float64), the units' norms in float64."""
    ga = np.asarray(raw_a, dtype=np.float32)
    gb = np.asarray(raw_b, dtype=np.float32)
    if not finite:
        # NaN/Inf would poison the whole matching: match on the finite values.
        ga, gb, ca, cb = _finite(ga), _finite(gb), _finite(ca), _finite(cb)
    g.g[...] += ga.T @ gb
    g.norms_a[...] += np.einsum("ij,ij->j", ca, ca)
    g.norms_b[...] += np.einsum("ij,ij->j", cb, cb)


def _finite(x: np.ndarray) -> np.ndarray:
    """`x` with NaN and +-Inf replaced by 0."""
    return np.where(np.isfinite(x), x, x.dtype.type(0))


def self_sums(a2: np.ndarray) -> Sums:
    """The sums of a tensor compared with itself (bit-identical files): one pass, not two."""
    n_rows, units = a2.shape
    step = _rows_per_chunk(units)
    saa = 0.0
    nonfinite = 0
    with np.errstate(invalid="ignore", over="ignore"):
        for r0 in range(0, n_rows, step):
            fa = _f64(a2[r0 : r0 + step]).reshape(-1)
            saa += sumsq(fa)
            if not math.isfinite(saa):
                nonfinite += int(fa.size - np.count_nonzero(np.isfinite(fa)))
    return Sums(saa=saa, sbb=saa, sab=saa, sdd=0.0, maxd=0.0, size=int(a2.size),
                nonfinite_a=nonfinite, nonfinite_b=nonfinite)
