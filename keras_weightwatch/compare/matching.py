"""Matching the units of two layers, and carrying a matching along the model's graph.

Two runs that learned the same thing can hold it in another order: the kernels
of a convolution, the units of a Dense layer. `match_units` finds the best
one-to-one matching of B's units to A's (Hungarian assignment on the cosine
similarity of the units, `scipy.optimize.linear_sum_assignment`) and the sums of
the pair after it. The matching of a layer's units is the order of the next
layer's inputs (`carried_in`), and passes through per-channel layers such as
BatchNormalization (`carried_out`).

The cosine matrix of a large layer costs rows x units x units products (69 GFLOP
for an 8192 x 2048 kernel), most of a matched diff. So `match_units` first
bounds it from a few leading rows (`BOUND_FRACTIONS`) and each unit's norm:
cos(a_i, b_j) <= <a_i, b_j> on those rows / (|a_i| |b_j|) + |rest of a_i| |rest
of b_j| / (|a_i| |b_j|) (Cauchy-Schwarz). The whole bound matrix is one float32
product (`_Bound`): the leading rows with each unit divided by its norm, and one
more row holding each unit's rest; a margin covers its float32 rounding. It
then solves the assignment on the bounds (or takes each unit's best bound),
replaces the bounds of the pairs it picks by their exact float64 cosines, and
checks again. An assignment made of exact cosines only that is optimal for the
bounds is optimal for the whole matrix (every other bound is at least its
cosine), so it is the same matching as the full matrix's; where that does not
happen within `BOUND_ROUNDS`, more rows are added, up to the full matrix (the
product of every row, each unit divided by its norm). The matched sums are
exact float64 either way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..reductions import (
    Gram,
    PerUnit,
    Sums,
    gram_rows_step,
    pair_sums,
    sums_and_gram,
    sums_per_unit,
)

EXTRA_HINT = "pip install 'keras-weightwatch[diff]'"
BOUND_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
"""The leading fractions of a kernel's rows whose Gram bounds its cosine matrix, tried
in turn before the full matrix (closely related runs are settled by the first)."""
BOUND_ROUNDS = 4
"""Assignments solved on one bound, each making the cosines of its pairs exact."""
BOUND_MIN_UNITS = 32
"""Smaller layers go straight to the full matrix (it costs less than a bound)."""
TIE_BONUS = 1e-9
"""Added to the cosine of a unit with itself: matchings that tie keep units in place."""

Perm = np.ndarray
"""perm[i] = the unit of B matched to unit i of A (int64)."""


class Matched(NamedTuple):
    """A kernel pair reduced with the best matching of its units."""

    sums: Sums
    """The raw sums (B as stored)."""
    matched: Sums
    """The sums with B's inputs in the carried order and its units matched to A's."""
    moved: int
    """How many units the matching moves."""
    perm: Perm


def _linear_sum_assignment() -> Callable[..., Any]:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:
        raise ImportError(
            f"matching units needs scipy: {EXTRA_HINT} (or pass match=False)"
        ) from e
    return linear_sum_assignment


def best_matching(gram: Gram) -> Perm:
    """perm[i] = the unit of B matched to unit i of A, maximising the summed cosine."""
    na, nb = gram.norms_a, gram.norms_b
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_a = np.where(na > 0, 1.0 / np.sqrt(na), 0.0)
        inv_b = np.where(nb > 0, 1.0 / np.sqrt(nb), 0.0)
    cos = gram.g  # scaled in place: one units x units matrix
    cos *= inv_a[:, None]
    cos *= inv_b[None, :]
    return assign_cosines(cos)


def assign_cosines(cos: np.ndarray) -> Perm:
    """The matching maximising the summed cosine of a units x units float64 cosine matrix
    (changed in place: NaN and Inf lose to any pair, each unit's own pair gains `TIE_BONUS`)."""
    lsa = _linear_sum_assignment()
    if not np.isfinite(cos).all():  # one pass where every cosine is finite (the usual case)
        np.nan_to_num(cos, copy=False, nan=-2.0, posinf=-2.0, neginf=-2.0)
    # Prefer keeping a unit in place when matchings tie (identical units).
    cos[np.diag_indices_from(cos)] += TIE_BONUS
    return _assign(lsa, cos)


def _assign(lsa: Callable[..., Any], cos: np.ndarray) -> Perm:
    rows, cols = lsa(cos, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def match_units(a2: np.ndarray, b2: np.ndarray, rows: np.ndarray | None,
                block: int | None = None) -> Matched:
    """Match the units (columns) of two (rows, units) kernels; `rows` orders B's inputs
    (within consecutive blocks of `block` rows, as `input_rows` makes them)."""
    blk = 1 if block is None else block
    n_rows, units = a2.shape
    ident = np.arange(units, dtype=np.int64)
    if units < BOUND_MIN_UNITS or n_rows <= 2:
        return _full_matching(a2, b2, rows, blk)
    s, per = sums_per_unit(a2, b2)  # B's units' norms do not depend on its row order
    if s.nonfinite_a or s.nonfinite_b or not np.isfinite(s.saa + s.sbb + s.sab):
        return _full_matching(a2, b2, rows, blk)  # it matches on the finite values
    head = _Bound(a2, b2, rows, per)
    perm, matched = _bounded_matching(head, s)
    if perm is None:  # the rest of the rows: the full cosine matrix (the leading rows kept)
        head.add_rows(n_rows)
        perm = assign_cosines(head.cosines())
    moved = int(np.sum(perm != ident))
    if matched is None:
        matched = pair_sums(a2, b2, rows=rows, cols=perm) if moved or rows is not None else s
    return Matched(sums=s, matched=matched, moved=moved, perm=perm)


def _full_matching(a2: np.ndarray, b2: np.ndarray, rows: np.ndarray | None, blk: int
                   ) -> Matched:
    # One pass: the raw sums with B as stored, the Gram with B's inputs in A's order.
    s, gram = sums_and_gram(a2, b2, rows, block=blk)
    perm = best_matching(gram)
    moved = int(np.sum(perm != np.arange(a2.shape[1])))
    matched = pair_sums(a2, b2, rows=rows, cols=perm) if moved or rows is not None else s
    return Matched(sums=s, matched=matched, moved=moved, perm=perm)


def _bounded_matching(head: _Bound, s: Sums) -> tuple[Perm | None, Sums | None]:
    """(the best matching, its sums if computed) when a bound from leading rows settles
    it; (None, None) when none does (`head` then holds the rows it added)."""
    lsa = _linear_sum_assignment()
    n_rows = head.a2.shape[0]
    est = 1.0
    for frac in BOUND_FRACTIONS:
        stop = math.ceil(frac * n_rows)
        if stop >= n_rows:
            break
        if est < 1 - frac:
            continue  # the tails' bound alone would be above the estimated cosines
        head.add_rows(stop)
        perm, matched, est = _settle(lsa, head, s)
        if perm is not None:
            return perm, matched
    return None, None


class _Bound:
    """Upper bounds of every unit pair's cosine, from the leading rows of a kernel pair.

    `g` is one float32 product: the leading rows of A and of B[rows], each unit
    divided by its float64 norm, and one more row of each unit's rest (|rest of
    a_i| / |a_i|), so g[i, j] = <a_i, b_j> on those rows / (|a_i| |b_j|) + |rest of
    a_i| |rest of b_j| / (|a_i| |b_j|), within `margin` (its float32 rounding).
    Adding rows adds their product, and a row that takes the previous rests off
    again. With every row added, the rests are 0 and `g` is the cosine matrix.
    """

    def __init__(self, a2: np.ndarray, b2: np.ndarray, rows: np.ndarray | None,
                 per: PerUnit) -> None:
        units = a2.shape[1]
        self.a2, self.b2, self.rows, self.per = a2, b2, rows, per
        self.inv_a, self.inv_b = _inv_norms(per.norms_a), _inv_norms(per.norms_b)
        self.head_a, self.head_b = np.zeros(units), np.zeros(units)  # float64, leading rows
        self.rest_a, self.rest_b = np.zeros(units), np.zeros(units)  # in `g` now
        self.extra_a, self.extra_b = np.zeros(units), np.zeros(units)  # rest rows, squared
        self.g = np.zeros((units, units), dtype=np.float32)  # replaced by the first product
        self.done = 0
        self.terms = 0  # float32 products summed into `g`
        self.longest = 0  # rows of the longest of them

    def add_rows(self, stop: int) -> None:
        """Add rows [done, stop) (in products of `gram_rows_step` rows), and this many
        rows' rests in place of the previous ones."""
        n_rows, units = self.a2.shape
        step = gram_rows_step(units)
        starts = range(self.done, stop, step) if stop > self.done else [self.done]
        for r0 in starts:
            r1 = min(stop, r0 + step)
            ca = np.asarray(self.a2[r0:r1], dtype=np.float64)
            cb = np.asarray(self.b2[r0:r1] if self.rows is None else self.b2[self.rows[r0:r1]],
                            dtype=np.float64)
            self.head_a += np.einsum("ij,ij->j", ca, ca)
            self.head_b += np.einsum("ij,ij->j", cb, cb)
            last = r1 == stop
            xa = np.empty((r1 - r0 + 2 * last, units), dtype=np.float32)
            xb = np.empty_like(xa)
            np.multiply(ca, self.inv_a, out=xa[:r1 - r0], casting="unsafe")
            np.multiply(cb, self.inv_b, out=xb[:r1 - r0], casting="unsafe")
            if last:  # this many rows' rests in, the previous ones out
                self._rests(xa, xb, stop == n_rows)
            p = xa.T @ xb
            if self.terms == 0:
                self.g = p
            else:
                self.g += p
            self.terms += 1
            self.longest = max(self.longest, len(xa))
        self.done = stop

    def _rests(self, xa: np.ndarray, xb: np.ndarray, every_row: bool) -> None:
        """Fill the last two rows of a product: the new rests, and the previous ones taken off."""
        if every_row:
            ta, tb = np.zeros_like(self.rest_a), np.zeros_like(self.rest_b)
        else:
            ta = np.sqrt(np.maximum(self.per.norms_a - self.head_a, 0.0)) * self.inv_a
            tb = np.sqrt(np.maximum(self.per.norms_b - self.head_b, 0.0)) * self.inv_b
        xa[-2], xb[-2] = ta, tb
        xa[-1], xb[-1] = -self.rest_a, self.rest_b
        self.extra_a += ta * ta + self.rest_a * self.rest_a
        self.extra_b += tb * tb + self.rest_b * self.rest_b
        self.rest_a, self.rest_b = ta, tb

    def margin(self) -> float:
        """A bound of the float32 rounding of every entry of `g`: the products' and their
        sum's, and the rounding of their operands to float32.

        Each entry sums products of vectors of squared norm at most 1 + `extra` (the
        leading rows of a unit over its norm, and the rest rows); with unit
        roundoff u = 2^-24, a float32 dot product of n terms is off by at most
        n u / (1 - n u) times the product of the norms, rounding the operands by 2 u,
        each sum of products by u: twice that is ample.
        """
        scale = math.sqrt(float(np.max(1.0 + self.extra_a)) * float(np.max(1.0 + self.extra_b)))
        return (self.longest + self.terms + 3) * 2.0 ** -23 * max(1.0, scale)

    def bounds(self) -> np.ndarray:
        """The float64 bound matrix: `g` plus its margin, and `TIE_BONUS` on the diagonal."""
        out = np.add(self.g, self.margin(), dtype=np.float64)
        out[np.diag_indices_from(out)] += TIE_BONUS
        return out

    def off_diagonal_max(self) -> np.ndarray:
        """Each unit's largest bound with any other unit of B (float64, margin added)."""
        diag = np.diag_indices_from(self.g)
        own = self.g[diag]
        self.g[diag] = -np.inf
        top = self.g.max(axis=1)
        self.g[diag] = own
        return top.astype(np.float64) + self.margin()

    def cosines(self) -> np.ndarray:
        """`g` in float64: the cosine matrix once every row is added."""
        return self.g.astype(np.float64)

    def estimate(self, best: Perm) -> np.ndarray:
        """Each unit's cosine with its `best` unit of B on the leading rows alone
        (NaN where either is 0 on them)."""
        ar = np.arange(len(best))
        dot = self.g[ar, best].astype(np.float64) - self.rest_a * self.rest_b[best]
        scale = (np.sqrt(self.head_a) * self.inv_a) * (np.sqrt(self.head_b) * self.inv_b)[best]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(scale > 0, dot / scale, np.nan)


def _inv_norms(sq: np.ndarray) -> np.ndarray:
    """1 / sqrt(sq), and 0 where sq is 0 (a zero unit's cosines are 0, as `best_matching`'s)."""
    return np.where(sq > 0, 1.0 / np.sqrt(np.where(sq > 0, sq, 1.0)), 0.0)


def _settle(lsa: Callable[..., Any], head: _Bound, raw: Sums
            ) -> tuple[Perm | None, Sums | None, float]:
    """The best matching and (where computed for it) its sums, when the bounds settle it,
    and the low decile of the units' best cosines estimated from the leading rows.

    Each round makes the cosines of the candidate's pairs exact; the candidate is
    the best matching once every unit's exact cosine beats the bounds of its other
    pairs, or once the assignment of the bounds picks exact pairs alone.
    """
    a2, b2, rows, per = head.a2, head.b2, head.rows, head.per
    units = a2.shape[1]
    ar = np.arange(units)
    inv_a, inv_b = head.inv_a, head.inv_b
    sums_for: tuple[Perm, Sums] | None = None
    own = per.dots * inv_a * inv_b + TIE_BONUS
    if rows is None:  # B's rows as stored: each unit's cosine with itself is known already
        sums_for = (ar, raw)
        if np.all(own > head.off_diagonal_max()):  # no unit moved (two epochs of one run)
            return ar, raw, 1.0
    bound = head.bounds()
    if rows is None:
        bound[ar, ar] = own
    likely, est = _likely(bound, head, None if rows is not None else own - TIE_BONUS)
    if not likely:
        return None, None, est
    exact = np.zeros((units, units), dtype=bool)
    if rows is None:
        exact[ar, ar] = True
    perm = np.argmax(bound, axis=1)
    if len(np.unique(perm)) < units:
        perm = _assign(lsa, bound)
    for _ in range(BOUND_ROUNDS):
        todo = np.flatnonzero(~exact[ar, perm])
        if 2 * len(todo) > units:  # one pass over every pair: the candidate's sums too
            sp, pu = sums_per_unit(a2, b2, rows, cols=perm)
            sums_for, dots = (perm, sp), pu.dots[todo]
        elif len(todo):
            dots = sums_per_unit(np.ascontiguousarray(a2[:, todo]), b2, rows,
                                 cols=perm[todo])[1].dots
        if len(todo):
            cos = dots * inv_a[todo] * inv_b[perm[todo]]
            bound[todo, perm[todo]] = cos + np.where(todo == perm[todo], TIE_BONUS, 0.0)
            exact[todo, perm[todo]] = True
        if not _rows_settled(bound, perm):
            perm = _assign(lsa, bound)
            if not exact[ar, perm].all():
                continue
        same = sums_for is not None and np.array_equal(sums_for[0], perm)
        return perm, sums_for[1] if same and sums_for is not None else None, est
    return None, None, est


def _likely(bound: np.ndarray, head: _Bound, own: np.ndarray | None = None
            ) -> tuple[bool, float]:
    """A cheap guess before any exact cosine: does most units' best pair look likely to
    beat its second-best bound (its cosine estimated from the leading rows alone, or
    each unit's exact cosine with itself, `own`, where that is higher)? And the low
    decile of those estimates."""
    ar = np.arange(bound.shape[0])
    best = np.argmax(bound, axis=1)
    top = bound[ar, best]
    bound[ar, best] = -np.inf
    second = np.max(bound, axis=1)
    bound[ar, best] = top
    est = head.estimate(best)
    if own is not None:  # a unit kept in place may beat a pair that merely bounds higher
        est = np.fmax(est, own)
    low = float(np.nanquantile(est, 0.1)) if np.any(np.isfinite(est)) else -1.0
    return bool(np.count_nonzero(est > second) >= 0.9 * len(ar)), low


def _rows_settled(bound: np.ndarray, perm: Perm) -> bool:
    """Whether each row's pair in `perm` beats every other entry of its row (then `perm`
    is the best assignment: each row takes its maximum)."""
    ar = np.arange(len(perm))
    chosen = bound[ar, perm]
    bound[ar, perm] = -np.inf
    others = np.max(bound, axis=1)
    bound[ar, perm] = chosen
    return bool(np.all(chosen > others))


def input_rows(shape: tuple[int, ...], carry: Perm) -> np.ndarray | None:
    """Row order of a units-last kernel's (rows, units) view with its input axis permuted."""
    n = len(carry)
    if len(shape) >= 3 and shape[-2] != n:
        return None
    n_rows = math.prod(shape[:-1])
    if len(shape) < 2 or n_rows % n:
        return None
    ar = np.arange(n_rows, dtype=np.int64)
    return (ar // n) * n + carry[ar % n]


def carried_in(feeds: Sequence[str] | None, out_perms: Mapping[str, Perm | None],
               previous: Perm | None) -> Perm | None:
    """The matching of a layer's inputs.

    Along the model's graph (`feeds` given): the matching of the layers that feed
    it, when all of them were matched the same way (an Add of two matched
    branches). Without a graph: what the previous layer in weight order passed on.
    """
    if feeds is None:
        return previous
    sources = [out_perms.get(src) for src in feeds]
    first = sources[0] if sources else None
    if first is not None and all(p is not None and np.array_equal(p, first) for p in sources):
        return first
    return None


def carried_out(carry: Perm | None, perm: Perm | None, has_kernel: bool,
                shapes: Sequence[tuple[int, ...]]) -> Perm | None:
    """The matching of a layer's outputs, given that of its inputs (`carry`).

    A layer with a matched kernel passes on its own matching (None when it was
    not matched); a per-channel layer (every compared tensor 1-d with one value
    per carried unit) passes its inputs' matching through; any other, none.
    """
    if has_kernel:
        return perm
    if carry is not None and shapes and all(
        len(shape) == 1 and shape[0] == len(carry) for shape in shapes
    ):
        return carry
    return None
