"""B's convolution kernels reordered to A's units, for drawing them side by side.

`diff_runs` reports the matched cosine of each kernel but keeps the matching
itself inside; the grids need the permutation. It is found the same way: per
kernel, the one-to-one assignment of B's output units to A's that maximises the
summed cosine (scipy's `linear_sum_assignment`), with B's inputs first put in
the order of the previous kernel's matching when their counts agree (a
sequential model's graph). The tests check that the cosine of A with the
reordered B equals `diff_runs`' `matched_cosine`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import Run
from ..naming import conv_kind, key_name
from .content import MAX_MATCH_UNITS, step_arg


@dataclass(frozen=True)
class Matching:
    """Per kernel key: `perm[i]` = B's unit drawn at A's unit `i`, and B's input order."""

    perms: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]


def _best(a2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    from scipy.optimize import linear_sum_assignment

    a = np.asarray(a2, dtype=np.float64)
    b = np.asarray(b2, dtype=np.float64)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = (a.T @ b) / (na[:, None] * nb[None, :])
    cos = np.nan_to_num(cos, nan=-2.0, posinf=-2.0, neginf=-2.0)
    cos[np.diag_indices_from(cos)] += 1e-9  # keep a unit in place when matchings tie
    rows, cols = linear_sum_assignment(cos, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def _matchable(class_name: str | None, shape: tuple[int, ...]) -> bool:
    """Units-last kernels whose units `diff_runs` matches: Dense, convolutions, unknown."""
    kind = conv_kind(class_name)
    known = class_name is None or class_name == "Dense" or (
        kind is not None and kind.units_axis == -1 and kind.matched_kernel == "kernel"
    )
    return known and 2 <= len(shape) <= 5 and shape[-1] <= MAX_MATCH_UNITS


def match_kernels(run_a: Run, snap_a, run_b: Run, snap_b) -> Matching:
    """The matching of every units-last kernel (Dense and convolutions) in weight order."""
    perms: dict[str, np.ndarray] = {}
    inputs: dict[str, np.ndarray] = {}
    carry: np.ndarray | None = None
    classes = {layer.name: layer.class_name for layer in run_a.layers}
    for spec in run_a.specs:
        key = spec.key
        if key_name(key) != "kernel" or key not in snap_a.tensors or key not in snap_b.tensors:
            continue
        ra, rb = snap_a.tensors[key], snap_b.tensors[key]
        shape = tuple(ra.shape)
        if ra.shape != rb.shape or not _matchable(classes.get(spec.layer), shape):
            carry = None
            continue
        a = np.asarray(run_a.tensor(key, step_arg(snap_a)))
        b = np.asarray(run_b.tensor(key, step_arg(snap_b)))
        if carry is not None and shape[-2] == len(carry):
            b = np.take(b, carry, axis=-2)
            inputs[key] = carry
        perm = _best(a.reshape(-1, shape[-1]), b.reshape(-1, shape[-1]))
        perms[key] = perm
        carry = perm
    return Matching(perms, inputs)


def reordered(b: np.ndarray, key: str, matching: Matching) -> np.ndarray:
    """B's kernel with its inputs and units in A's order (as is when no matching applies)."""
    out = np.asarray(b)
    if key in matching.inputs:
        out = np.take(out, matching.inputs[key], axis=-2)
    if key in matching.perms:
        out = np.take(out, matching.perms[key], axis=-1)
    return out
