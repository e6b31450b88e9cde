"""Test helpers shared by several test files (import as `from helpers import ...`)."""

from __future__ import annotations

import numpy as np


def assert_same_arrays(got: dict, expected: list) -> None:
    """`got` (key -> array, model.weights order) equals `expected` bit for bit."""
    arrays = list(got.values())
    assert len(arrays) == len(expected)
    for (key, a), b in zip(got.items(), expected):
        assert a.shape == b.shape, key
        assert a.dtype == b.dtype, key
        assert np.array_equal(a, b, equal_nan=True), key
        assert a.tobytes() == np.ascontiguousarray(b).tobytes(), key
