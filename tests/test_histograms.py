"""histograms: fixed bins checked against numpy.histogram; NaN, Inf and empty tensors are safe."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from keras_weightwatch.histograms import DEFAULT_BINS, histogram


@pytest.mark.parametrize("bins", [1, 7, 30])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "float16"])
def test_matches_numpy_histogram(bins, dtype):
    x = (np.random.default_rng(1).normal(size=(13, 17)) * 10).astype(dtype)
    counts, edges = np.histogram(x.astype(np.float64), bins=bins)
    h = histogram(x, bins)
    assert h.shape == (bins, 3)
    np.testing.assert_allclose(h[:, 0], edges[:-1])
    np.testing.assert_allclose(h[:, 1], edges[1:])
    np.testing.assert_array_equal(h[:, 2], counts)


def test_nan_and_inf_are_left_out_and_never_empty_the_histogram():
    x = np.array([1.0, 2.0, np.nan, np.inf, -np.inf, 3.0], dtype=np.float32)
    h = histogram(x, 4)
    assert h[0, 0] == 1.0 and h[-1, 1] == 3.0
    assert h[:, 2].sum() == 3  # the finite values
    assert np.all(np.isfinite(h))


@pytest.mark.parametrize(
    "values", [np.array([]), np.full(5, np.nan), np.array([np.inf, -np.inf]), np.zeros((0, 3))]
)
def test_no_finite_value_gives_zero_counts_not_an_empty_histogram(values):
    h = histogram(values)
    assert h.shape == (DEFAULT_BINS, 3)
    assert h[0, 0] == -0.5 and h[-1, 1] == 0.5 and h[:, 2].sum() == 0


def test_constant_tensor_is_one_full_bucket_around_the_value():
    h = histogram(np.full(7, 2.5), 3)
    np.testing.assert_allclose(h[:, 0], [2.0, 2.0 + 1 / 3, 2.0 + 2 / 3])
    np.testing.assert_array_equal(h[:, 2], [0, 7, 0])


def test_huge_span_does_not_overflow():
    h = histogram(np.array([-1e308, 1e308, 0.0]), 2)
    assert np.all(np.isfinite(h)) and h[:, 2].tolist() == [1, 2]
    assert h[0, 0] == -1e308 and h[-1, 1] == 1e308


def test_bool_and_complex():
    assert histogram(np.array([True, False, True]), 2)[:, 2].tolist() == [1, 2]
    h = histogram(np.array([3 + 4j, 0j]), 1)
    assert h[0].tolist() == [0.0, 5.0, 2.0]


@pytest.mark.parametrize("bins", [0, -1, 2.5, True])
def test_bad_bins(bins):
    with pytest.raises(ValueError, match=f"Received: bins={bins!r}"):
        histogram(np.ones(3), bins)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=32),
    ),
    st.integers(1, 40),
)
def test_counts_always_sum_to_the_finite_values(x, bins):
    h = histogram(x, bins)
    assert h.shape == (bins, 3)
    assert h[:, 2].sum() == np.isfinite(x).sum()
    assert np.all(np.isfinite(h)) and np.all(h[:, 1] >= h[:, 0])


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_blockwise_counts_equal_numpy_across_block_boundaries(monkeypatch, block):
    from keras_weightwatch import histograms as module

    monkeypatch.setattr(module, "_BLOCK", block)
    monkeypatch.setattr(module, "_BLOCK64", block)
    rng = np.random.default_rng(block)
    for dtype in ("float32", "float64"):
        x = rng.normal(size=2503).astype(dtype)
        x[[5, 700, 2000]] = [np.nan, np.inf, -np.inf]
        got = histogram(x, bins=17)
        finite = x[np.isfinite(x)].astype(np.float64)
        counts, edges = np.histogram(finite, bins=17, range=(finite.min(), finite.max()))
        np.testing.assert_array_equal(got[:, 2], counts)
        np.testing.assert_allclose(got[:, 0], edges[:-1])


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.float32, st.integers(2, 300),
               elements=st.floats(-1e6, 1e6, allow_nan=False, width=32)),
    st.integers(1, 40),
)
def test_float32_values_on_and_beside_every_edge_are_binned_as_numpy_does(x, bins):
    # The edges rounded to float32 and their float32 neighbours: the values a float32-only
    # binning could put in the wrong bucket.
    lo, hi = float(x.min()), float(x.max())
    if lo == hi:
        return
    edges32 = np.linspace(lo, hi, bins + 1).astype(np.float32)
    near = np.concatenate([edges32, np.nextafter(edges32, np.float32(np.inf)),
                           np.nextafter(edges32, np.float32(-np.inf))])
    values = np.concatenate([x, near[(near >= x.min()) & (near <= x.max())]])
    counts, _ = np.histogram(values.astype(np.float64), bins=bins, range=(lo, hi))
    np.testing.assert_array_equal(histogram(values, bins)[:, 2], counts)


def _edge_heavy(n: int, bins: int, seed: int) -> np.ndarray:
    """`n` float32 values, a third of them on, just below or just above the float32
    roundings of the edges of `bins` buckets over their range (top value included)."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=n) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
    x[0], x[1] = -1.7, 2.3  # a fixed range, so the edges are known in advance
    edges32 = np.linspace(-1.7, 2.3, bins + 1).astype(np.float32)
    near = np.concatenate([edges32, np.nextafter(edges32, np.float32(np.inf)),
                           np.nextafter(edges32, np.float32(-np.inf))])
    near = near[(near >= np.float32(-1.7)) & (near <= np.float32(2.3))]
    spots = rng.choice(np.arange(2, n), size=n // 3, replace=False)
    x[spots] = near[rng.integers(0, near.size, size=spots.size)]
    return np.clip(x, np.float32(-1.7), np.float32(2.3))


@pytest.mark.parametrize("bins", [1, 2, 7, 30, 39, 40, 100, 255, 256, 1000])
@pytest.mark.parametrize("block", [1000, 1 << 18])
def test_packed_bucket_counts_equal_numpy_on_and_beside_the_edges(monkeypatch, bins, block):
    """Large tensors count their buckets three (or two) at a time in one key: every
    number of buckets and block length gives numpy's counts exactly."""
    from keras_weightwatch import histograms as module

    monkeypatch.setattr(module, "_BLOCK", block)
    # Three buckets a key from 8 * (bins + 1)**3 values (and at most 1 << 16 keys), two below.
    x = _edge_heavy(600_001 if bins in (39, 40) else 300_001, bins, bins)
    x[[10, 20_000, 69_999]] = [np.nan, np.inf, -np.inf]
    finite = x[np.isfinite(x)].astype(np.float64)
    counts, edges = np.histogram(finite, bins=bins, range=(finite.min(), finite.max()))
    got = histogram(x, bins)
    np.testing.assert_array_equal(got[:, 2], counts)
    np.testing.assert_allclose(got[:, 0], edges[:-1])
    assert got[:, 2].sum() == x.size - 3


@pytest.mark.parametrize("n", [7, 64, 255, 256, 257, 8 * 31**3 - 1, 8 * 31**3 + 2])
def test_every_tensor_size_around_the_packing_thresholds(n):
    x = _edge_heavy(max(n, 3), 30, n)[:n]
    f = x.astype(np.float64)
    counts, _ = np.histogram(f, bins=30, range=(f.min(), f.max()))
    np.testing.assert_array_equal(histogram(x)[:, 2], counts)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8", "uint16", "bool", "complex64"])
def test_other_dtypes_equal_numpy_on_their_float64_values(dtype):
    import ml_dtypes

    raw = np.random.default_rng(4).normal(size=5000) * 30
    if dtype == "complex64":
        raw = raw + 1j * raw[::-1]
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    x = (raw > 0 if dtype == "bool" else raw).astype(dt)
    f = (np.abs(x) if dtype == "complex64" else x).astype(np.float64)
    counts, _ = np.histogram(f, bins=30, range=(f.min(), f.max()) if f.min() < f.max() else None)
    np.testing.assert_array_equal(histogram(x)[:, 2], counts)


def test_a_range_of_two_subnormals_is_binned_as_numpy_does():
    # bins / (hi - lo) is beyond float32 here: the float64 path counts them.
    x = np.array([0.0, 5.04e-43], dtype=np.float32)
    counts, _ = np.histogram(x.astype(np.float64), bins=1, range=(0.0, float(x[1])))
    np.testing.assert_array_equal(histogram(x, 1)[:, 2], counts)
