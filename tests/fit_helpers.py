"""A tiny MLP, its data and the checks the callback tests share.

Import as `from fit_helpers import ...`.
"""

from __future__ import annotations

import threading

import keras
import numpy as np


def _data(n=32, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x @ rng.normal(size=(d, 1))).astype("float32")
    return x, y


def _mlp(frozen=False):
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(6, name="base"), keras.layers.Dense(1, name="head")]
    )
    model.layers[0].trainable = not frozen
    model.compile(optimizer="adam", loss="mse")
    return model


def _worker_threads():
    return [t for t in threading.enumerate() if t.name == "weightwatch" and t.is_alive()]


class EpochCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends: list[int] = []

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(epoch)
