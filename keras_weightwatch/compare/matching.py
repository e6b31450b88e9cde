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
bounds it from the Gram of a few leading rows (`BOUND_FRACTIONS`) and each
unit's norm: cos(a_i, b_j) <= (<a_i, b_j> on those rows + |rest of a_i| |rest
of b_j|) / (|a_i| |b_j|) (Cauchy-Schwarz), then solves the assignment on the
bounds (or takes each unit's best bound), replaces the bounds of the pairs it
picks by their exact float64 cosines, and checks again. An assignment made of
exact cosines only that is optimal for the bounds is optimal for the whole
matrix (every other bound is at least its cosine), so it is the same matching
as the full matrix's; where that does not happen within `BOUND_ROUNDS`, more
rows are added, up to the full matrix. The bounds include the float32 rounding
of the Gram products; the matched sums are exact float64 either way.
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
    add_gram_rows,
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
    lsa = _linear_sum_assignment()
    na, nb = gram.norms_a, gram.norms_b
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_a = np.where(na > 0, 1.0 / np.sqrt(na), 0.0)
        inv_b = np.where(nb > 0, 1.0 / np.sqrt(nb), 0.0)
    cos = gram.g  # scaled in place: one units x units matrix
    cos *= inv_a[:, None]
    cos *= inv_b[None, :]
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
    head = Gram(np.zeros((units, units)), np.zeros(units), np.zeros(units))
    perm, matched, done = _bounded_matching(a2, b2, rows, s, per, head)
    if perm is None:  # the rest of the rows: the full matrix, as `_full_matching` makes it
        add_gram_rows(head, a2, b2, done, n_rows, rows)
        perm = best_matching(Gram(head.g, per.norms_a, per.norms_b))
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


def _bounded_matching(a2: np.ndarray, b2: np.ndarray, rows: np.ndarray | None, s: Sums,
                      per: PerUnit, head: Gram
                      ) -> tuple[Perm | None, Sums | None, int]:
    """(the best matching, its sums if computed, the rows added to `head`) when a bound
    from leading rows settles it; (None, None, rows added) when none does."""
    lsa = _linear_sum_assignment()
    n_rows, units = a2.shape
    done, est = 0, 1.0
    for frac in BOUND_FRACTIONS:
        stop = math.ceil(frac * n_rows)
        if stop >= n_rows:
            break
        if est < 1 - frac:
            continue  # the tails' bound alone would be above the estimated cosines
        add_gram_rows(head, a2, b2, done, stop, rows)
        done = stop
        perm, matched, est = _settle(lsa, a2, b2, rows, head, per, gram_rows_step(units), s)
        if perm is not None:
            return perm, matched, done
    return None, None, done


def _upper_bounds(head: Gram, per: PerUnit, k: int) -> np.ndarray:
    """Upper bounds of every unit pair's cosine, from the Gram of the leading rows (float32
    products of at most `k` rows each: a rounding bound of (k + 4) * 2^-23 is added)."""
    # <a_i, b_j> <= (the head's float32 product + its rounding bound) + |tail a_i| |tail b_j|
    inv_a, inv_b = _inv_norms(per.norms_a), _inv_norms(per.norms_b)
    ta = np.sqrt(np.maximum(per.norms_a - head.norms_a, 0.0)) * inv_a
    tb = np.sqrt(np.maximum(per.norms_b - head.norms_b, 0.0)) * inv_b
    ha = (k + 4) * 2.0 ** -23 * np.sqrt(head.norms_a) * inv_a
    hb = np.sqrt(head.norms_b) * inv_b
    ub = np.empty_like(head.g)
    step = max(1, (1 << 16) // max(1, len(tb)))  # rows whose temporaries stay in cache
    for r0 in range(0, len(ta), step):
        r = slice(r0, r0 + step)
        out = ub[r]
        np.multiply(head.g[r], inv_b[None, :], out=out)
        out *= inv_a[r, None]
        out += np.outer(ta[r], tb)
        out += np.outer(ha[r], hb)
    ub[np.diag_indices_from(ub)] += TIE_BONUS
    return ub


def _inv_norms(sq: np.ndarray) -> np.ndarray:
    """1 / sqrt(sq), and 0 where sq is 0 (a zero unit's cosines are 0, as `best_matching`'s)."""
    return np.where(sq > 0, 1.0 / np.sqrt(np.where(sq > 0, sq, 1.0)), 0.0)


def _settle(lsa: Callable[..., Any], a2: np.ndarray, b2: np.ndarray, rows: np.ndarray | None,
            head: Gram, per: PerUnit, k: int, raw: Sums
            ) -> tuple[Perm | None, Sums | None, float]:
    """The best matching and (where computed for it) its sums, when the bounds settle it,
    and the low decile of the units' best cosines estimated from the leading rows.

    Each round makes the cosines of the candidate's pairs exact; the candidate is
    the best matching once every unit's exact cosine beats the bounds of its other
    pairs, or once the assignment of the bounds picks exact pairs alone.
    """
    bound = _upper_bounds(head, per, k)
    units = bound.shape[0]
    ar = np.arange(units)
    inv_a, inv_b = _inv_norms(per.norms_a), _inv_norms(per.norms_b)
    sums_for: tuple[Perm, Sums] | None = None
    if rows is None:  # B's rows as stored: each unit's cosine with itself is known already
        sums_for = (ar, raw)
        bound[ar, ar] = per.dots * inv_a * inv_b + TIE_BONUS
        if _rows_settled(bound, ar):  # no unit moved (two epochs of one run, most often)
            return ar, raw, 1.0
    likely, est = _likely(bound, head)
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


def _likely(bound: np.ndarray, head: Gram) -> tuple[bool, float]:
    """A cheap guess before any exact cosine: does most units' best pair look likely to
    beat its second-best bound (its cosine estimated from the leading rows alone)? And
    the low decile of those estimates."""
    ar = np.arange(bound.shape[0])
    best = np.argmax(bound, axis=1)
    top = bound[ar, best]
    bound[ar, best] = -np.inf
    second = np.max(bound, axis=1)
    bound[ar, best] = top
    with np.errstate(divide="ignore", invalid="ignore"):
        est = head.g[ar, best] / np.sqrt(head.norms_a * head.norms_b[best])
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
