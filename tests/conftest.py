"""Shared fixtures: quiet TensorFlow, fixed seeds, tiny models."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


class WeightsRecorder:
    """An independent reference: records model.get_weights() at train begin and each epoch end."""

    def __new__(cls):
        import keras

        class _Recorder(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.initial = None
                self.epochs: dict[int, list[np.ndarray]] = {}

            def on_train_begin(self, logs=None):
                self.initial = [np.array(w, copy=True) for w in self.model.get_weights()]

            def on_epoch_end(self, epoch, logs=None):
                self.epochs[epoch] = [np.array(w, copy=True) for w in self.model.get_weights()]

        return _Recorder()


@pytest.fixture
def recorder():
    return WeightsRecorder()


@pytest.fixture(autouse=True)
def _seed():
    import random

    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_keras_names():
    """Each test builds its models with fresh layer names (dense, dense_1, ...).

    Without the full garbage collection `clear_session` runs by default: it took about
    0.34 s per test (most of the unit tests' time), the names are reset without it, and
    Python's own collector still runs.
    """
    import sys

    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session(free_memory=False)
    yield
