"""Per-thread scratch buffers: reused within a thread, never shared between names or threads;
handed on by threads that run under `kept`; `empty`: arrays mapped in at once."""

from __future__ import annotations

import resource
import sys
import threading

import numpy as np
import pytest

from keras_weightwatch import scratch as scratch_module
from keras_weightwatch.scratch import empty, kept, scratch


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


def _in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def _kept_buffer(n=4096):
    with kept():
        buf = scratch("test.kept", n)
        buf[:] = 7.0
        return buf


def test_a_thread_under_kept_hands_its_buffers_to_the_next():
    first = _in_thread(_kept_buffer)
    second = _in_thread(_kept_buffer)
    assert np.shares_memory(first, second)  # the next worker starts with them mapped
    assert not np.shares_memory(first, _in_thread(lambda: scratch("test.kept", 4096)))


def test_threads_under_kept_at_once_never_share():
    inside, release, found = threading.Barrier(2), threading.Event(), []

    def hold():
        with kept():
            buf = scratch("test.kept2", 1024)
            inside.wait()
            found.append(buf)
            release.wait()

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    while len(found) < 2:
        threading.Event().wait(0.01)
    release.set()
    for t in threads:
        t.join()
    assert not np.shares_memory(found[0], found[1])
    assert len(scratch_module._SPARE) <= scratch_module._MAX_SPARE


@pytest.mark.parametrize("shape, dtype", [((3, 5), np.float32), ((1024, 257), np.float64),
                                          ((0,), np.float32), ((7, 0, 3), np.int8),
                                          ((300_000,), np.complex64), ((4,), object)])
def test_empty_is_a_writable_c_ordered_array_of_the_shape_and_dtype(shape, dtype):
    a = empty(shape, dtype)
    assert a.shape == shape and a.dtype == np.dtype(dtype)
    assert a.flags.c_contiguous and a.flags.writeable and a.flags.aligned
    a[...] = 1
    np.testing.assert_array_equal(a, np.ones(shape, dtype))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MAP_POPULATE is Linux's")
def test_a_large_empty_is_zeros_already_mapped_in():
    n = 8 << 20

    def write_faults():
        a = empty((n,), np.uint8)
        zeros = not a.any()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        a[::4096] = 1  # one write per page
        return zeros, resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

    zeros, faults = _in_thread(write_faults)
    assert zeros
    assert faults < (n // 4096) // 8  # an array of numpy's own faults 500-2,000 times here
