"""What the Keras benchmarks share: the machine line, a timed WeightWatch, the worker's timer.

Imported by the scripts in this folder (`python benchmarks/<script>.py` puts the folder on
`sys.path`). Importing it sets the TensorFlow backend unless KERAS_BACKEND says otherwise.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from machine import machine  # noqa: E402, F401 (re-exported for the scripts)

from keras_weightwatch import WeightWatch  # noqa: E402
from keras_weightwatch.pipeline import Pipeline  # noqa: E402


class TimedWeightWatch(WeightWatch):
    """WeightWatch with each hook timed (the training thread's time inside it).

    `buffer_sets` is how many sets of host buffers the fit allocated (1 when the worker
    kept up).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hook_times: dict[str, list[float]] = {}
        self.buffer_sets = 0

    def _timed(self, name, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.hook_times.setdefault(name, []).append(time.perf_counter() - t0)

    def on_train_begin(self, logs=None):
        self._timed("on_train_begin", super().on_train_begin, logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._timed("on_epoch_begin", super().on_epoch_begin, epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._timed("on_epoch_end", super().on_epoch_end, epoch, logs)

    def on_train_end(self, logs=None):
        self.buffer_sets = self.pipeline.pool.created if self.pipeline is not None else 0
        self._timed("on_train_end", super().on_train_end, logs)


WORKER_TIMES: list[float] = []


def time_worker() -> None:
    """Append the wall time of each snapshot the background worker handles to WORKER_TIMES."""

    class TimedPipeline(Pipeline):
        def handle(self, job):
            t0 = time.perf_counter()
            try:
                super().handle(job)
            finally:
                WORKER_TIMES.append(time.perf_counter() - t0)

    TimedWeightWatch.pipeline_class = TimedPipeline


def med(xs):
    return statistics.median(xs) if xs else float("nan")
