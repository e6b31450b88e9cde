"""What the Keras benchmarks share: the machine line, a timed WeightWatch, the worker's timer.

Imported by the scripts in this folder (`python benchmarks/<script>.py` puts the folder on
`sys.path`). Importing it sets the TensorFlow backend unless KERAS_BACKEND says otherwise.
"""

from __future__ import annotations

import os
import statistics
import threading
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
WORKER_CPU: list[float] = []


def time_worker() -> None:
    """Append the wall time of each snapshot the background worker writes to WORKER_TIMES,
    and the CPU time of each job the worker handles (a snapshot, the deferred views of the
    initial one, a buffer set made ahead) to WORKER_CPU."""

    class TimedPipeline(Pipeline):
        def write(self, snapshot, payloads):
            t0 = time.perf_counter()
            try:
                super().write(snapshot, payloads)
            finally:
                WORKER_TIMES.append(time.perf_counter() - t0)

        def handle(self, job):
            c0 = time.thread_time()
            try:
                super().handle(job)
            finally:
                WORKER_CPU.append(time.thread_time() - c0)

    TimedWeightWatch.pipeline_class = TimedPipeline


HOOKS = ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_end",
         "on_train_batch_begin", "on_train_batch_end", "on_test_begin", "on_test_end",
         "on_test_batch_begin", "on_test_batch_end")


class CostMeter:
    """The cost measure of one callback in one fit (see benchmarks/README.md).

    cost = wall time inside the callback's hooks on the training thread (`on_train_end`'s
    wait included) + CPU time (user + sys) of every thread that appeared while one of its
    hooks ran, read when `on_train_end` begins. Only the hooks the callback overrides are
    wrapped (a default batch hook stays default, so Keras keeps its dispatch asynchronous).
    Threads are told apart by their kernel ids (psutil), so native threads count too.
    """

    def __init__(self, callback):
        import psutil

        self._proc = psutil.Process()
        self.callback = callback
        self.hook_wall: dict[str, float] = {}
        self.hook_calls: dict[str, int] = {}
        self.thread_ids: set[int] = set()
        self.thread_names: dict[int, str] = {}  # read when each appeared
        self.thread_cpu = 0.0
        self.batch_threads = 0  # Python threads that appeared during a batch hook
        from keras.src.utils.python_utils import is_default

        for name in HOOKS:
            method = getattr(callback, name, None)
            if method is not None and not is_default(method):
                setattr(callback, name, self._wrap(name, method))

    def _tids(self) -> set[int]:
        return {t.id for t in self._proc.threads()}

    def _cpu_of_started(self) -> float:
        return sum(t.user_time + t.system_time for t in self._proc.threads()
                   if t.id in self.thread_ids)

    def _wrap(self, name, method):
        def timed(*args, **kwargs):
            # Outside the timed window. Batch hooks are checked by Python's thread count only
            # (cheap: listing kernel threads at every batch would slow the fit itself).
            batch = "batch" in name
            before = set() if batch else self._tids()
            n_python = threading.active_count()
            if name == "on_train_end":
                self.thread_cpu = self._cpu_of_started()
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.hook_wall[name] = self.hook_wall.get(name, 0.0) + time.perf_counter() - t0
                self.hook_calls[name] = self.hook_calls.get(name, 0) + 1
                if not batch:
                    for tid in self._tids() - before:
                        self.thread_ids.add(tid)
                        self.thread_names[tid] = thread_name(tid)
                elif threading.active_count() > n_python:
                    self.batch_threads += threading.active_count() - n_python

        return timed

    @property
    def hooks(self) -> float:
        return sum(self.hook_wall.values())

    @property
    def total(self) -> float:
        return self.hooks + self.thread_cpu


def thread_name(tid: int) -> str:
    """A thread's name: Python's for its threads, else the kernel's."""
    for t in threading.enumerate():
        if t.native_id == tid:
            return t.name
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return f"thread {tid}"


def med(xs):
    return statistics.median(xs) if xs else float("nan")
