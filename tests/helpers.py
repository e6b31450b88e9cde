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


def fd_input_unit(model, x, units, eps=1e-6):
    """Central differences of sum_b y[b, units[b]] with respect to x."""
    g = np.zeros_like(x)

    def score(z):
        y = np.asarray(model(z, training=False)).reshape(len(z), -1)
        return y[np.arange(len(z)), units].sum()

    for j in range(x.size):
        hi, lo = x.copy(), x.copy()
        hi.flat[j] += eps
        lo.flat[j] -= eps
        g.flat[j] = (score(hi) - score(lo)) / (2 * eps)
    return g


def split(array: np.ndarray, rows: int, cols: int) -> list:
    """`array` (2-d) cut into a grid of rows x cols blocks, as `capture.Shard`s."""
    from keras_weightwatch.capture import Shard

    out = []
    r_edges = np.linspace(0, array.shape[0], rows + 1).astype(int)
    c_edges = np.linspace(0, array.shape[1], cols + 1).astype(int)
    for r0, r1 in zip(r_edges, r_edges[1:]):
        for c0, c1 in zip(c_edges, c_edges[1:]):
            out.append(Shard((int(r0), int(c0)), array[r0:r1, c0:c1].copy()))
    return out


def sharded_model(shapes: dict):
    """A `ModelInfo` of float32 weights `key -> shape` (no Keras model needed)."""
    from keras_weightwatch.run import ModelInfo, WeightSpec

    return ModelInfo("m", "Fake", (), tuple(
        WeightSpec(k, f"m/{k}", k.split("/")[0], tuple(s), "float32", True)
        for k, s in shapes.items()))
def invert_diverging(rgb: np.ndarray) -> np.ndarray:
    """Colours of `images.diverging_rgb(..., 1.0)` back to values in [-1, 1] (nearest colour)."""
    from keras_weightwatch.images import diverging_rgb

    t = np.linspace(-1, 1, 4001)
    lut = diverging_rgb(t, 1.0).astype(np.int32)
    d = np.abs(rgb.reshape(-1, 1, 3).astype(np.int32) - lut[None]).sum(-1)
    return t[np.argmin(d, axis=1)].reshape(rgb.shape[:-1])


def run_group(run) -> str:
    """The group of a run's image tags: its model's name as the run's header records it."""
    from keras_weightwatch.naming import model_group

    return model_group(run.model.get("name", ""), run.model.get("class_name", ""))


def run_kernel_tags(run) -> dict[str, str]:
    """Weight key -> kernel-grid tag for a run whose convolution layers are all top-level:
    the kernels of the layers the header lists as convolutions, numbered in model order."""
    from keras_weightwatch.naming import conv_kind
    from keras_weightwatch.summaries import kernel_tag

    kinds = {layer.name: conv_kind(layer.class_name) for layer in run.layers}
    keys = [s.key for s in run.specs
            if kinds.get(s.layer) is not None and s.key == f"{s.layer}/{kinds[s.layer].kernel}"]
    return {k: kernel_tag(run_group(run), k, i, len(keys)) for i, k in enumerate(keys)}
