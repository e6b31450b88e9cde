"""Per-thread scratch buffers: reused within a thread, never shared between names or threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from keras_weightwatch.scratch import scratch


def test_one_name_is_one_buffer_that_grows_and_is_kept():
    a = scratch("test.a", 8)
    assert a.shape == (8,) and a.dtype == np.float64
    assert np.shares_memory(scratch("test.a", 4), a)  # smaller: the same memory
    big = scratch("test.a", 1000)
    assert big.shape == (1000,)
    assert np.shares_memory(scratch("test.a", 8), big)  # grown, then kept


def test_names_and_dtypes_never_alias():
    a = scratch("test.b", 16)
    assert not np.shares_memory(a, scratch("test.c", 16))
    f32 = scratch("test.b", 16, np.float32)
    assert f32.dtype == np.float32 and not np.shares_memory(a, f32)


def test_each_thread_has_its_own():
    mine = scratch("test.d", 32)
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(scratch("test.d", 32)))
    t.start()
    t.join()
    assert not np.shares_memory(mine, theirs[0])


def test_a_negative_size_is_refused():
    with pytest.raises(ValueError, match="Received: n=-1"):
        scratch("test.e", -1)


def test_statistics_and_histograms_are_unchanged_by_reuse():
    """Results computed through the reused buffers equal numpy's, call after call (a stale
    buffer from a larger earlier tensor must not leak into a smaller one)."""
    from keras_weightwatch.histograms import histogram
    from keras_weightwatch.stats import tensor_stats

    rng = np.random.default_rng(0)
    for n in (300_000, 1_000, 70_000, 5):
        x = rng.normal(size=n).astype(np.float32)
        p = x + rng.normal(scale=1e-3, size=n).astype(np.float32)
        s = tensor_stats(x, p)
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(s["l2_norm"], np.linalg.norm(x64), rtol=1e-12)
        np.testing.assert_allclose(s["mean"], x64.mean(), rtol=1e-9, atol=1e-15)
        np.testing.assert_allclose(
            s["update_ratio"],
            np.linalg.norm(x64 - p.astype(np.float64)) / np.linalg.norm(p.astype(np.float64)),
            rtol=1e-9)
        counts, _ = np.histogram(x64, bins=30, range=(x64.min(), x64.max()))
        np.testing.assert_array_equal(histogram(x)[:, 2], counts)
