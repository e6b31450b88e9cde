"""`reductions`: chunked float64 sums of a tensor pair against plain numpy, at every chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keras_weightwatch import reductions, stats
from keras_weightwatch.reductions import Sums, as_2d, pair_sums, pair_sums_gram, self_sums


def _pair(seed: int, shape=(37, 11), dtype="float32"):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape).astype(dtype)
    b = (a + rng.normal(size=shape)).astype(dtype)
    return a, b


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_pair_sums_equal_numpy_with_rows_and_cols_reordered(monkeypatch, chunk):
    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", chunk)
    a, b = _pair(0)
    rng = np.random.default_rng(1)
    rows, cols = rng.permutation(a.shape[0]), rng.permutation(a.shape[1])
    for r, c in ((None, None), (rows, None), (None, cols), (rows, cols)):
        bb = b.astype(np.float64)
        bb = bb if r is None else bb[r]
        bb = bb if c is None else bb[:, c]
        aa = a.astype(np.float64)
        s = pair_sums(a, b, rows=r, cols=c)
        assert s.saa == pytest.approx(np.sum(aa * aa), rel=1e-12)
        assert s.sbb == pytest.approx(np.sum(bb * bb), rel=1e-12)
        assert s.sab == pytest.approx(np.sum(aa * bb), rel=1e-12)
        assert s.sdd == pytest.approx(np.sum((bb - aa) ** 2), rel=1e-12)
        assert s.maxd == np.max(np.abs(bb - aa)) and s.size == a.size
        assert s.rel_l2() == pytest.approx(np.linalg.norm(bb - aa) / np.linalg.norm(aa), rel=1e-12)
        assert s.cosine() == pytest.approx(
            np.sum(aa * bb) / (np.linalg.norm(aa) * np.linalg.norm(bb)), rel=1e-12)
        assert s.rms() == pytest.approx(np.sqrt(np.mean((bb - aa) ** 2)), rel=1e-12)


@pytest.mark.parametrize("chunk", [5, 1 << 20])
def test_gram_is_a_transpose_b_and_the_units_squared_norms(monkeypatch, chunk):
    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", chunk)
    a, b = _pair(2, shape=(40, 6))
    rows = np.random.default_rng(3).permutation(40)
    s, gram = pair_sums_gram(a, b, rows=rows)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)[rows]
    np.testing.assert_allclose(gram.g, a64.T @ b64, rtol=1e-5)  # float32 products
    np.testing.assert_allclose(gram.norms_a, np.sum(a64 ** 2, axis=0), rtol=1e-12)
    np.testing.assert_allclose(gram.norms_b, np.sum(b64 ** 2, axis=0), rtol=1e-12)
    assert s.sab == pytest.approx(np.sum(a64 * b64), rel=1e-12)


def test_self_sums_equal_the_pair_sums_of_a_tensor_with_itself():
    a, _ = _pair(4)
    s, t = self_sums(a), pair_sums(a, a)
    assert (s.saa, s.sbb, s.sab, s.sdd, s.maxd, s.size) == pytest.approx(
        (t.saa, t.sbb, t.sab, t.sdd, t.maxd, t.size), rel=1e-12)
    assert s.cosine() == 1.0 and s.rel_l2() == 0.0


def test_non_finite_values_are_counted_and_make_the_results_nan():
    a, b = _pair(5)
    b = b.copy()
    b.flat[[0, 3, 50]] = [np.nan, np.inf, -np.inf]
    s = pair_sums(a, b)
    assert (s.nonfinite_a, s.nonfinite_b) == (0, 3)
    assert math.isnan(s.maxd) and math.isnan(s.rel_l2()) and math.isnan(s.cosine())
    t = self_sums(b)
    assert (t.nonfinite_a, t.nonfinite_b) == (3, 3)


def test_zero_tensors_follow_the_documented_conventions():
    z, one = np.zeros((3, 2)), np.ones((3, 2))
    assert pair_sums(z, z).rel_l2() == 0.0 and pair_sums(z, z).cosine() == 1.0
    assert pair_sums(z, one).rel_l2() == math.inf and pair_sums(z, one).cosine() == 0.0
    total = Sums()
    total.add(pair_sums(one, z))
    total.add(pair_sums(one, one))
    assert total.rel_l2() == pytest.approx(np.sqrt(6 / 12)) and total.size == 12


def test_as_2d_keeps_the_last_axis_and_splits_complex_values():
    assert as_2d(np.zeros((2, 3, 4))).shape == (6, 4)
    assert as_2d(np.zeros(5)).shape == (5, 1) and as_2d(np.array(2.0)).shape == (1, 1)
    c = np.array([1 + 2j, 3 - 4j], dtype=np.complex64)
    np.testing.assert_array_equal(as_2d(c)[:, 0], [1, 2, 3, -4])


@pytest.mark.parametrize("dtype", ["float32", "float16", "int32", "complex64"])
def test_update_ratio_equals_numpy(monkeypatch, dtype):
    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", 13)
    prev, arr = _pair(6, shape=(9, 8), dtype="float32")
    prev, arr = (prev * 10).astype(dtype), (arr * 10).astype(dtype)
    if dtype == "complex64":
        prev = prev + 1j * prev[::-1]
        arr = arr - 2j * arr
    p, a = np.abs(prev).astype(np.float64), np.abs(arr).astype(np.float64)
    if dtype != "complex64":
        p, a = prev.astype(np.float64), arr.astype(np.float64)
    expect = np.linalg.norm(a - p) / np.linalg.norm(p)
    assert stats.update_ratio(arr, prev) == pytest.approx(expect, rel=1e-6)
    assert stats.update_ratio(prev, prev) == 0.0
    assert math.isnan(stats.update_ratio(arr, np.zeros_like(prev)))
    assert stats.tensor_stats(arr, prev)["update_ratio"] == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_sums_and_gram_reads_b_as_stored_and_reorders_it_for_the_gram(monkeypatch, chunk):
    from keras_weightwatch.compare.matching import input_rows
    from keras_weightwatch.reductions import sums_and_gram

    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", chunk)
    a, b = _pair(6, shape=(3 * 3 * 4, 5))  # a (3, 3, 4, 5) kernel as (rows, units)
    carry = np.array([2, 0, 3, 1])
    rows = input_rows((3, 3, 4, 5), carry)
    s, gram = sums_and_gram(a, b, rows, block=4)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    # The Gram against numpy's fancy indexing of B's rows; the sums against B as stored.
    np.testing.assert_allclose(gram.g, a64.T @ b64[rows], rtol=1e-5)
    np.testing.assert_allclose(gram.norms_b, np.sum(b64 ** 2, axis=0), rtol=1e-12)
    assert s.sab == pytest.approx(np.sum(a64 * b64), rel=1e-12)
    assert s.sdd == pytest.approx(np.sum((b64 - a64) ** 2), rel=1e-12)


@pytest.mark.parametrize("n", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5])
def test_sum_of_squares_equals_exact_sum_at_every_row_boundary(n):
    x = np.random.default_rng(n).normal(size=n) * 10.0
    assert reductions.sumsq(x) == pytest.approx(math.fsum(x * x), rel=1e-14, abs=0.0)
