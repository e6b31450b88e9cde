"""Tiny trainings with one planted problem, for the health tests.

Import as `from health_helpers import ...`.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_weightwatch import WeightWatch


def regression(n=512, d=8, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(d, 1))).astype("float32")
    return x, (y * scale).astype("float32")


def _fit(model, run_dir, x, y, epochs, **watch):
    watch.setdefault("histograms", False)
    watch.setdefault("kernel_images", False)
    return model.fit(x, y, epochs=epochs, batch_size=64, verbose=0, shuffle=False,
                     callbacks=[WeightWatch(str(run_dir), **watch)])


def healthy_fit(run_dir, epochs=2, **watch):
    """A small ReLU MLP trained by Adam: nothing wrong."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    x, y = regression(n=256)
    model = keras.Sequential([keras.Input((8,)),
                              keras.layers.Dense(16, activation="relu", name="hidden1"),
                              keras.layers.Dense(16, activation="relu", name="hidden2"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return _fit(model, run_dir, x, y, epochs, **watch)


def constant_fit(run_dir, epochs=3, **watch):
    """Two Dense layers with a constant kernel initialiser in a row: the first one's units
    stay identical (symmetry, in layer `constant`); the second's are broken by the output."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    x, y = regression(n=256)
    const = keras.initializers.Constant(0.1)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", kernel_initializer=const, name="constant"),
        keras.layers.Dense(16, activation="relu", kernel_initializer=const, name="constant2"),
        keras.layers.Dense(1, name="out"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return _fit(model, run_dir, x, y, epochs, **watch)


def diverging_fit(run_dir, epochs=10, **watch):
    """SGD at learning rate 1e6 on targets scaled by 1e3: every weight is NaN after the
    first epoch (non_finite, first in layer `hidden1`)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    x, y = regression(scale=1e3)
    model = keras.Sequential([keras.Input((8,)),
                              keras.layers.Dense(16, activation="relu", name="hidden1"),
                              keras.layers.Dense(16, activation="relu", name="hidden2"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1e6), loss="mse")
    return _fit(model, run_dir, x, y, epochs, **watch)
