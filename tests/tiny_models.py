"""Tiny Keras models and data shared by the run reader and writer tests."""

from __future__ import annotations

import numpy as np


def data(n=32, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x @ rng.normal(size=(d, 1))).astype("float32")
    return x, y


def sequential():
    import keras

    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )


def functional_with_nested():
    import keras

    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="inner")
    inp = keras.Input((4,))
    h = keras.layers.Dense(3, activation="tanh")(inp)
    h = inner(h)
    out = keras.layers.Dense(1)(h)
    return keras.Model(inp, out)


def subclassed():
    import keras

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.a = keras.layers.Dense(3, activation="relu")
            self.b = keras.layers.Dense(1)
            self.scale = self.add_weight(shape=(1,), initializer="ones", name="scale")

        def call(self, x):
            return self.b(self.a(x)) * self.scale

    m = Subclassed()
    m(np.zeros((1, 4), "float32"))
    return m
