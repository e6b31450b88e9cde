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
