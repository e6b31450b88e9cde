"""stats.tensor_stats against a numpy float64 oracle, whatever the chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keras_weightwatch import stats


@pytest.mark.parametrize("chunk", [1, 7, 1000, 1 << 20])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "int32"])
def test_statistics_equal_numpy_across_chunk_boundaries(monkeypatch, chunk, dtype):
    monkeypatch.setattr(stats, "CHUNK", chunk)
    rng = np.random.default_rng(chunk)
    a = (rng.normal(size=(41, 61)) * 3).astype(dtype)
    prev = (a + rng.normal(size=a.shape)).astype(dtype)
    clean = stats.tensor_stats(a, prev)  # before any NaN/Inf is planted
    p, c = prev.astype(np.float64).ravel(), a.astype(np.float64).ravel()
    assert clean["update_ratio"] == pytest.approx(
        np.sqrt(np.sum((c - p) ** 2)) / np.sqrt(np.sum(p * p)), rel=1e-9)
    if dtype.startswith("float"):
        a.flat[[3, 1000, 2400]] = [np.nan, np.inf, -np.inf]
    s = stats.tensor_stats(a, prev)
    x = a.astype(np.float64).ravel()
    fin = x[np.isfinite(x)]
    assert s["nan_count"] == np.isnan(x).sum()
    assert s["inf_count"] == np.isinf(x).sum()
    assert s["size"] == a.size
    assert s["l2_norm"] == pytest.approx(np.sqrt(np.sum(fin * fin)), rel=1e-12)
    assert s["mean"] == pytest.approx(fin.mean(), rel=1e-9, abs=1e-12)
    assert s["std"] == pytest.approx(fin.std(), rel=1e-9)
    assert s["max_abs"] == np.abs(fin).max()
    if dtype.startswith("float"):  # a non-finite change has no finite ratio
        assert not math.isfinite(s["update_ratio"])


def _numpy_stats(a: np.ndarray, prev: np.ndarray | None) -> dict[str, float]:
    """The statistics by their definitions, in float64 numpy (the oracle)."""
    x = a.astype(np.float64).ravel()
    fin = x[np.isfinite(x)]
    out = {"l2_norm": np.sqrt(np.sum(fin * fin)), "mean": fin.mean(), "std": fin.std(),
           "max_abs": np.abs(fin).max(), "nan_count": np.isnan(x).sum(),
           "inf_count": np.isinf(x).sum(), "size": x.size}
    if prev is not None:
        p = prev.astype(np.float64).ravel()
        with np.errstate(invalid="ignore"):
            d = np.sum((x - p) ** 2)
        out["update_ratio"] = np.sqrt(d) / np.sqrt(np.sum(p * p)) if np.isfinite(d) else np.nan
    return {k: float(v) for k, v in out.items()}


def _tiles(shape, cuts):
    """The slices of `shape` cut at `cuts` (one list of cut points per axis)."""
    import itertools

    axes = [[slice(a, b) for a, b in zip([0, *c], [*c, n])] for c, n in zip(cuts, shape)]
    return list(itertools.product(*axes))


@pytest.mark.parametrize("chunk", [5, 1 << 20])
@pytest.mark.parametrize("cuts", [([], []), ([20], []), ([], [1, 30, 60]), ([3, 40], [7, 8])])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_partial_sums_of_parts_combine_to_the_whole(monkeypatch, chunk, cuts, nonfinite):
    monkeypatch.setattr(stats, "CHUNK", chunk)
    rng = np.random.default_rng(len(cuts[0]) * 10 + len(cuts[1]))
    a = (rng.normal(size=(41, 61)) * 3 + 100).astype("float32")  # a large mean: no cancellation
    prev = (a + rng.normal(size=a.shape)).astype("float32")
    if nonfinite:
        a.flat[[3, 1000, 2400, 2500]] = [np.nan, np.inf, -np.inf, np.nan]
    tiles = _tiles(a.shape, cuts)
    parts = [stats.partial_stats(a[t], prev[t]) for t in tiles]
    got = stats.finish(stats.combine(reversed(parts)))  # any order
    want = _numpy_stats(a, prev)
    assert set(got) == set(want) == set(stats.tensor_stats(a, prev))
    for name, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[name]), name
        else:
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    without = stats.finish(stats.combine(stats.partial_stats(a[t]) for t in tiles))
    assert "update_ratio" not in without
    one_missing = [stats.partial_stats(a[t], prev[t] if i else None) for i, t in enumerate(tiles)]
    assert "update_ratio" not in stats.finish(stats.combine(one_missing))


def test_partial_sums_keep_the_spread_of_a_large_mean():
    """Chan's merge of mean and m2, not sums of squares subtracted: the std of values near
    1e8 that differ by units survives being split in parts."""
    x = 1e8 + np.arange(10_000, dtype=np.float64) % 7
    parts = [stats.partial_stats(p) for p in np.array_split(x, 13)]
    assert stats.finish(stats.combine(parts))["std"] == pytest.approx(x.std(), rel=1e-9)


def test_partial_sums_of_empty_and_all_nonfinite_parts():
    empty = stats.finish(stats.combine([stats.partial_stats(np.zeros((0, 3)))]))
    assert empty["size"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["max_abs"])
    a = np.array([np.nan, np.inf, 1.0, -2.0])
    got = stats.finish(stats.combine([stats.partial_stats(a[:2]), stats.partial_stats(a[2:])]))
    assert (got["nan_count"], got["inf_count"], got["size"]) == (1.0, 1.0, 4.0)
    assert (got["mean"], got["max_abs"], got["l2_norm"]) == (-0.5, 2.0, math.sqrt(5.0))


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16", "int8", "int64",
                                   "uint8", "bool", "complex64"])
def test_every_dtype_equals_the_float64_oracle_over_several_chunks(monkeypatch, dtype):
    import ml_dtypes

    monkeypatch.setattr(stats, "CHUNK", 1000)
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(37, 101)) * 20
    if dtype == "complex64":
        raw = raw + 1j * rng.normal(size=raw.shape)
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    a = (raw > 0 if dtype == "bool" else raw).astype(dt)
    prev = (raw < 1 if dtype == "bool" else raw[::-1]).astype(dt)
    before = a.copy()
    got = stats.tensor_stats(a, prev)
    np.testing.assert_array_equal(a, before)  # the tensor is only read
    mag = np.abs(a) if dtype == "complex64" else a
    pmag = np.abs(prev) if dtype == "complex64" else prev
    want = _numpy_stats(mag, pmag)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name


@pytest.mark.parametrize("where", [0, 499, 500, 1234, 2499])
def test_nonfinite_values_anywhere_in_a_chunk_are_counted_and_left_out(monkeypatch, where):
    monkeypatch.setattr(stats, "CHUNK", 500)
    for dtype in ("float32", "float64", "float16"):
        a = np.linspace(-3, 5, 2500).astype(dtype)
        a[where] = np.nan
        a[(where + 777) % a.size] = -np.inf
        got = stats.tensor_stats(a)
        want = _numpy_stats(a, None)
        assert (got["nan_count"], got["inf_count"]) == (1.0, 1.0)
        for name in ("l2_norm", "mean", "std", "max_abs"):
            assert got[name] == pytest.approx(want[name], rel=1e-12), (dtype, name)


def test_a_tensor_larger_than_one_chunk_against_a_previous_one_with_nan():
    rng = np.random.default_rng(5)
    a = rng.normal(size=stats.CHUNK * 2 + 123).astype("float32")
    prev = (a + rng.normal(size=a.shape).astype("float32") * 1e-3).astype("float32")
    got = stats.tensor_stats(a, prev)
    want = _numpy_stats(a, prev)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name
    prev[stats.CHUNK + 7] = np.nan
    got = stats.tensor_stats(a, prev)
    assert math.isnan(got["update_ratio"]) and got["nan_count"] == 0.0


def test_empty_and_frozen_tensors():
    empty = stats.tensor_stats(np.zeros((0, 4), "float32"), np.zeros((0, 4), "float32"))
    assert empty["size"] == 0.0 and math.isnan(empty["mean"]) and empty["update_ratio"] == 0.0
    a = np.arange(12, dtype="float32").reshape(3, 4)
    assert stats.tensor_stats(a, a.copy())["update_ratio"] == 0.0
    assert math.isnan(stats.tensor_stats(a, np.zeros_like(a))["update_ratio"])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8, np.complex64])
@pytest.mark.parametrize("size", [3, 11, stats.CHUNK * 3 + 5])
def test_same_stats_of_unchanged_bytes_are_tensor_stats(dtype, size):
    rng = np.random.default_rng(size)
    prev = (rng.standard_normal(size) * 50).astype(dtype).reshape(-1, 1)
    before = stats.tensor_stats(prev, prev[::-1].copy())  # its own statistics, with a ratio
    got = stats.same_stats(prev.copy(), prev, before)
    assert got == stats.tensor_stats(prev.copy(), prev)  # the reference: the whole pass
    assert list(got) == list(stats.tensor_stats(prev.copy(), prev))
    assert stats.same_stats(prev.copy(), prev, stats.tensor_stats(prev)) == got


def test_same_stats_leaves_every_other_case_to_tensor_stats():
    rng = np.random.default_rng(0)
    prev = rng.standard_normal((64, 4099)).astype(np.float32)
    own = stats.tensor_stats(prev)
    for i in (0, prev.size // 2, prev.size - 1):  # a change anywhere: in each chunk, the tail
        moved = prev.copy()
        moved.reshape(-1)[i] = np.nextafter(moved.reshape(-1)[i], np.float32(np.inf))
        assert stats.same_stats(moved, prev, own) is None
    assert stats.same_stats(prev.copy(), None, own) is None
    assert stats.same_stats(prev.copy(), prev, None) is None
    assert stats.same_stats(prev.astype(np.float64), prev, own) is None
    flipped = prev.T.copy()
    assert stats.same_stats(flipped, flipped.copy(), stats.tensor_stats(flipped)) is not None
    assert stats.same_stats(prev.T, prev.T, stats.tensor_stats(prev.T)) is None  # not C order
    empty = np.zeros((0, 3), np.float32)  # no finite value: NaN statistics, computed
    assert stats.same_stats(empty, empty.copy(), stats.tensor_stats(empty)) is None
    nan = prev.copy()
    nan[0, 0] = np.nan
    want = stats.tensor_stats(nan.copy(), nan)
    assert stats.same_stats(nan.copy(), nan, stats.tensor_stats(nan)) is None
    assert math.isnan(want["update_ratio"])  # why: NaN - NaN is no zero update
