"""Matching the units of two layers, and carrying a matching along the model's graph.

Two runs that learned the same thing can hold it in another order: the kernels
of a convolution, the units of a Dense layer. `match_units` finds the best
one-to-one matching of B's units to A's (Hungarian assignment on the cosine
similarity of the units, `scipy.optimize.linear_sum_assignment`) and the sums of
the pair after it. The matching of a layer's units is the order of the next
layer's inputs (`carried_in`), and passes through per-channel layers such as
BatchNormalization (`carried_out`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ..reductions import Gram, Sums, pair_sums, sums_and_gram

EXTRA_HINT = "pip install 'keras-weightwatch[diff]'"
DEFAULT_MAX_MATCH_UNITS = 2048
"""Layers with more units are not matched (the units x units matrix and the O(n^3)
assignment grow quickly; 2048 units take about 0.3 s)."""

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
    cos[np.diag_indices_from(cos)] += 1e-9
    rows, cols = lsa(cos, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def match_units(a2: np.ndarray, b2: np.ndarray, rows: np.ndarray | None,
                block: int | None = None) -> Matched:
    """Match the units (columns) of two (rows, units) kernels; `rows` orders B's inputs
    (within consecutive blocks of `block` rows, as `input_rows` makes them)."""
    # One pass: the raw sums with B as stored, the Gram with B's inputs in A's order.
    s, gram = sums_and_gram(a2, b2, rows, block=1 if block is None else block)
    perm = best_matching(gram)
    moved = int(np.sum(perm != np.arange(a2.shape[1])))
    matched = pair_sums(a2, b2, rows=rows, cols=perm) if moved or rows is not None else s
    return Matched(sums=s, matched=matched, moved=moved, perm=perm)


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
