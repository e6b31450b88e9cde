"""health.measures: per-unit reductions, checked against plain numpy oracles."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from keras_weightwatch.health.measures import (
    COLLAPSED_BELOW,
    UNITS,
    UNITS_COLLAPSED,
    UNITS_DUPLICATE,
    dead_units,
    duplicate_units,
    is_unit_kernel,
    snapshot_unit_measures,
    unit_measures,
)


def _oracle(kernel: np.ndarray) -> dict[str, float]:
    """Units, collapsed and duplicate units, the slow and obvious way (float64 columns)."""
    cols = np.asarray(kernel).astype(np.float64).reshape(-1, kernel.shape[-1]).T
    finite = np.isfinite(cols).all(axis=1)
    norms = np.linalg.norm(cols, axis=1)
    med = np.median(norms[finite]) if finite.any() else 0.0
    if med > 0:
        collapsed = np.sum(finite & (norms <= COLLAPSED_BELOW * med))
    else:
        collapsed = np.sum(finite & (norms == 0))
    good = cols[finite]
    dup = 0
    if len(good):
        _, inverse, counts = np.unique(good, axis=0, return_inverse=True, return_counts=True)
        dup = int(np.sum(counts[np.ravel(inverse)] > 1))
    return {UNITS: float(cols.shape[0]), UNITS_COLLAPSED: float(collapsed),
            UNITS_DUPLICATE: float(dup)}


def _kernel(shape, seed, dup=(), collapse=(), nan=()):
    """A random kernel of `shape`; units `dup[i][1]` copy unit `dup[i][0]`, units in
    `collapse` are scaled to 1e-6 of their norm, units in `nan` hold one NaN."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape)
    flat = w.reshape(-1, shape[-1])
    for src, dst in dup:
        flat[:, dst] = flat[:, src]
    for u in collapse:
        flat[:, u] *= 1e-6
    for u in nan:
        flat[0, u] = np.nan
    return flat.reshape(shape)


CASES = {
    "dense": ((6, 5), {}),
    "dense dup": ((6, 5), {"dup": [(0, 3)]}),
    "dense two groups": ((4, 8), {"dup": [(0, 1), (0, 2), (5, 6)]}),
    "dense collapsed": ((6, 5), {"collapse": [2, 4]}),
    "dense nan column": ((6, 5), {"nan": [1], "dup": [(1, 2)]}),
    "dense nan and dup": ((6, 5), {"nan": [4], "dup": [(0, 1)], "collapse": [3]}),
    "conv": ((3, 3, 2, 7), {}),
    "conv dup and collapsed": ((3, 3, 2, 7), {"dup": [(1, 6)], "collapse": [0]}),
    "conv1d": ((3, 4, 5), {"dup": [(2, 3)]}),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_unit_measures_match_the_oracle(case, dtype):
    shape, plant = CASES[case]
    w = _kernel(shape, seed=len(case), **plant).astype(dtype)
    assert unit_measures(w) == _oracle(w)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_unit_measures_of_half_precision_kernels(dtype):
    w = _kernel((8, 6), seed=1, dup=[(0, 5)], collapse=[2]).astype(dtype)
    got = unit_measures(w)
    assert got == _oracle(w)
    assert got[UNITS_DUPLICATE] == 2 and got[UNITS_COLLAPSED] == 1


def test_planted_counts_are_what_the_oracle_sees():
    got = unit_measures(_kernel((4, 8), seed=0, dup=[(0, 1), (0, 2), (5, 6)], collapse=[3]))
    assert got == {UNITS: 8.0, UNITS_COLLAPSED: 1.0, UNITS_DUPLICATE: 5.0}


@pytest.mark.parametrize("shape", [(4, 3), (3, 3, 2, 4)])
def test_all_zero_kernel_is_all_collapsed_and_all_duplicate(shape):
    got = unit_measures(np.zeros(shape, np.float32))
    n = float(shape[-1])
    assert got == {UNITS: n, UNITS_COLLAPSED: n, UNITS_DUPLICATE: n}


def test_all_nan_kernel_has_neither_collapsed_nor_duplicate_units():
    got = unit_measures(np.full((4, 3), np.nan, np.float32))
    assert got == {UNITS: 3.0, UNITS_COLLAPSED: 0.0, UNITS_DUPLICATE: 0.0}


def test_inf_columns_are_not_duplicates_of_each_other():
    w = _kernel((5, 4), seed=2)
    w[:, 1] = np.inf
    w[:, 2] = np.inf
    assert unit_measures(w) == _oracle(w)
    assert unit_measures(w)[UNITS_DUPLICATE] == 0


def test_columns_with_equal_sums_are_not_duplicates():
    # Each column sums to 3: grouped by sum, then compared element by element.
    w = np.array([[1.0, 2.0, 0.0, 1.0], [2.0, 1.0, 3.0, 2.0]])
    assert duplicate_units(w) == 2  # columns 0 and 3
    assert unit_measures(w)[UNITS_DUPLICATE] == _oracle(w)[UNITS_DUPLICATE]


@pytest.mark.parametrize("seed", range(4))
def test_duplicate_units_matches_np_unique_on_small_integer_columns(seed):
    # Small integers: many equal sums, some equal columns.
    w = np.random.default_rng(seed).integers(0, 3, size=(3, 20)).astype(np.float64)
    _, inverse, counts = np.unique(w.T, axis=0, return_inverse=True, return_counts=True)
    assert duplicate_units(w) == int(np.sum(counts[np.ravel(inverse)] > 1))


def test_duplicate_units_leaves_out_columns_whose_reduction_is_not_finite():
    w = np.ones((3, 4))
    assert duplicate_units(w) == 4
    assert duplicate_units(w, np.array([3.0, 3.0, np.nan, np.inf])) == 2
    assert duplicate_units(w, np.array([3.0, np.nan, np.inf, -np.inf])) == 0


@pytest.mark.parametrize("shape", [(6, 5), (3, 3, 2, 7)])
def test_dead_units_matches_the_oracle(shape):
    g = _kernel(shape, seed=3)
    flat = g.reshape(-1, shape[-1])
    flat[:, [0, 2]] = 0.0
    flat[1:, 3] = 0.0  # one non-zero entry: not dead
    flat[0, 4] = np.nan  # NaN is not a zero gradient
    g = flat.reshape(shape)
    expected = int(np.sum(np.all(g.reshape(-1, shape[-1]) == 0, axis=0)))
    assert dead_units(g) == expected == 2


def test_dead_units_of_a_zero_gradient_and_of_a_negative_zero():
    assert dead_units(np.zeros((4, 3))) == 3
    assert dead_units(np.full((4, 3), -0.0)) == 3
    assert dead_units(np.ones((4, 3), ml_dtypes.bfloat16)) == 0


@pytest.mark.parametrize(
    ("key", "shape", "expected"),
    [
        ("dense/kernel", (4, 3), True),
        ("model/block/dense/kernel", (4, 2), True),
        ("conv/kernel", (3, 3, 2, 8), True),
        ("conv3d/kernel", (2, 2, 2, 3, 4), True),
        ("conv1d/kernel", (3, 4, 5), True),
        ("quantized/_kernel", (4, 3), True),
        ("dense/kernel", (4, 1), False),  # one unit: nothing to compare
        ("dense/kernel", (0, 3), False),  # no incoming weights
        ("dense/kernel", (3,), False),
        ("dense/kernel", (2, 2, 2, 2, 2, 2), False),
        ("dense/bias", (3,), False),
        ("attention/query/bias", (4, 8), False),
        ("embedding/embeddings", (10, 4), False),
        ("dense/lora_kernel_a", (4, 2), False),
        ("kernel_something/gamma", (4, 3), False),
    ],
)
def test_is_unit_kernel(key, shape, expected):
    assert is_unit_kernel(key, shape) is expected


def test_snapshot_unit_measures_skips_keys_it_does_not_hold():
    arrays = {"a/kernel": _kernel((4, 3), seed=0, dup=[(0, 1)]), "b/kernel": np.zeros((2, 2))}
    got = snapshot_unit_measures(arrays, ["a/kernel", "missing/kernel"])
    assert got == {"a/kernel": _oracle(arrays["a/kernel"])}
    assert got["a/kernel"][UNITS_DUPLICATE] == 2


def test_units_equal_on_the_probed_rows_but_not_elsewhere_are_not_duplicates():
    # Same first, middle and last row and the same squared norm (a swapped pair of values
    # in between): only the whole comparison tells them apart.
    w = np.zeros((5, 3), np.float32)
    w[:, 0] = [1, 2, 3, 4, 5]
    w[:, 1] = [1, 4, 3, 2, 5]
    w[:, 2] = [1, 2, 3, 4, 5]
    assert unit_measures(w)["units_duplicate"] == 2.0  # columns 0 and 2
    assert duplicate_units(w[:, :2]) == 0
