"""feature_sensitivity: a planted irrelevant input ranks last, where the kernel's row norm
ranks it first; linear stacks give the product of their kernels; finite differences agree."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_weightwatch.features import feature_weights
from keras_weightwatch.sensitivity import feature_sensitivity

F64 = "float64"


def planted_nonlinear():
    """4 inputs -> Dense(4, tanh) -> Dense(2, softplus). Input 3 has the largest first-layer
    weights, but only into hidden unit 3, whose outgoing weights are zero: no effect."""
    model = keras.Sequential(
        [
            keras.Input((4,), dtype=F64),
            keras.layers.Dense(4, activation="tanh", name="hidden", dtype=F64),
            keras.layers.Dense(2, activation="softplus", name="out", dtype=F64),
        ]
    )
    w1 = np.array(
        [[0.8, -0.5, 0.3, 0.0],
         [-0.4, 0.9, 0.2, 0.0],
         [0.3, 0.2, -0.7, 0.0],
         [0.0, 0.0, 0.0, 5.0]]
    )
    w2 = np.array([[1.0, -0.5], [0.7, 0.9], [-0.8, 0.4], [0.0, 0.0]])
    model.set_weights([w1, np.array([0.1, -0.1, 0.0, 0.2]), w2, np.array([0.0, 0.1])])
    return model


def sample(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4)) * np.array([1.0, 2.0, 0.5, 1.0])


def fd_sensitivity(model, x, eps=1e-6):
    """std_i * sum_u mean_b |dy_u/dx_i| by central differences of the model's output."""
    scores = np.zeros(x.shape[1])
    for i in range(x.shape[1]):
        hi, lo = x.copy(), x.copy()
        hi[:, i] += eps
        lo[:, i] -= eps
        d = (np.asarray(model(hi, training=False)) - np.asarray(model(lo, training=False))) / (
            2 * eps)
        scores[i] = np.abs(d).mean(axis=0).sum() * x[:, i].std()
    return scores


def test_planted_irrelevant_input_ranks_last_where_the_row_norm_ranks_it_first():
    model = planted_nonlinear()
    x = sample()
    row_norm = feature_weights(model.get_layer("hidden").kernel.numpy())
    assert int(np.argmax(row_norm)) == 3  # the table's current ranking puts it first
    s = feature_sensitivity(model, x)
    assert s.ranking()[-1] == 3
    assert s.scores[3] == 0.0
    assert s.units == ((0, 0), (0, 1))
    np.testing.assert_allclose(s.std, x.std(axis=0), rtol=1e-12)
    np.testing.assert_allclose(s.scores, fd_sensitivity(model, x), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(s.per_unit.sum(axis=1), s.scores, rtol=1e-12)


def test_linear_stack_gives_the_product_of_its_kernels():
    model = keras.Sequential([keras.Input((3,), dtype=F64),
                              keras.layers.Dense(4, dtype=F64),
                              keras.layers.Dense(3, dtype=F64)])
    x = np.random.default_rng(1).normal(size=(20, 3))
    w1, _, w2, _ = model.get_weights()
    s = feature_sensitivity(model, x, max_rows=40)  # two chunks of 2 and 1 units
    np.testing.assert_allclose(s.mean_abs_gradient, np.abs(w1 @ w2), rtol=1e-12)
    np.testing.assert_allclose(s.scores, x.std(axis=0) * np.abs(w1 @ w2).sum(axis=1),
                               rtol=1e-12)


def test_features_at_a_layer_input_and_several_outputs():
    inp = keras.Input((2, 2), dtype=F64)
    flat = keras.layers.Flatten(dtype=F64)(inp)
    h = keras.layers.Dense(3, activation="tanh", name="dense", dtype=F64)(flat)
    a = keras.layers.Dense(2, name="a", dtype=F64)(h)
    b = keras.layers.Dense(1, name="b", dtype=F64)(h)
    model = keras.Model(inp, [a, b])
    x = np.random.default_rng(2).normal(size=(10, 2, 2))
    at_layer = feature_sensitivity(model, x, layer="dense")
    at_input = feature_sensitivity(model, x)
    assert at_layer.units == ((0, 0), (0, 1), (1, 0)) and at_layer.layer == "dense"
    np.testing.assert_allclose(at_layer.scores, at_input.scores, rtol=1e-12)
    with pytest.raises(ValueError, match=r"at least 2 examples for a std. Received: n=1"):
        feature_sensitivity(model, x[:1])
