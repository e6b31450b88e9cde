"""The pipeline: back-pressure, the event file, a dropped view, and faults while writing
(training never dies because of monitoring).

Each scenario injects one fault into the run directory's I/O while `fit` runs and
checks that (a) `fit` completes, (b) exactly one `WeightWatchWarning` names what
stopped, (c) every snapshot completed before the fault still loads, verifies and
equals `get_weights()`, and (d) `strict=True` turns the same fault into a
`WeightWatchError`.

How faults are simulated (the tests run as root, and chmod does not stop root):
`open` inside `keras_weightwatch.run.storage` (the one module where the run's
files are opened) and `keras_weightwatch.summaries` is
replaced by one that, once the run holds `k` complete snapshots, fails the way
the kernel would: ENOSPC part-way through a write (disk full), EACCES at `open`
(permission revoked), or the run directory is really deleted with `shutil.rmtree`.
The trigger is the number of committed snapshot files, so which snapshot fails
is deterministic although writing runs on a background thread.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
import threading
import time
import warnings

import keras
import numpy as np
import pytest
from fit_helpers import EpochCounter, _mlp
from fit_helpers import _data as _mlp_data
from helpers import assert_same_arrays
from view_helpers import (
    _acc,
    _cnn,
    _fit,
    _kernel_tags,
    _values,
)

from keras_weightwatch import WeightWatch, WeightWatchError, WeightWatchWarning, load_run
from keras_weightwatch import summaries as summaries_mod
from keras_weightwatch.capture import BufferPool
from keras_weightwatch.pipeline import Pipeline
from keras_weightwatch.run import storage as storage_mod
from keras_weightwatch.views import ResponseView


@pytest.mark.parametrize("max_queue", [1, 2])
def test_slow_writer_makes_training_wait_instead_of_growing_memory(tmp_path, max_queue):
    gate = threading.Event()
    lock = threading.Lock()
    counts = {"captured": 0, "handled": 0, "peak_alive": 0}

    class GatedPipeline(Pipeline):
        def take(self, *args, **kwargs):
            out = super().take(*args, **kwargs)  # the copy into the pool's buffers
            with lock:
                counts["captured"] += 1
                counts["peak_alive"] = max(counts["peak_alive"],
                                           counts["captured"] - counts["handled"])
            return out

        def write(self, snapshot, payloads):
            gate.wait(timeout=60)  # the writer is stuck until the test lets it go
            super().write(snapshot, payloads)
            with lock:
                counts["handled"] += 1

    counter = EpochCounter()
    cb = WeightWatch(tmp_path / "run", max_queue=max_queue)
    cb.pipeline_class = GatedPipeline
    seen = {}

    def observe():
        try:
            # Writer holds the initial snapshot; max_queue epoch snapshots wait in the queue;
            # the next epoch end finds no free buffer and waits.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and len(counter.ends) < max_queue + 1:
                time.sleep(0.01)
            time.sleep(0.5)
            seen["ends"] = list(counter.ends)
            pipeline = cb.pipeline
            seen["created"] = pipeline.pool.created if pipeline is not None else None
            seen["in_use"] = pipeline.pool.in_use if pipeline is not None else None
            with lock:
                seen["captured"] = counts["captured"]
        finally:
            gate.set()

    watcher = threading.Thread(target=observe)
    watcher.start()
    x, y = _mlp_data()
    model = _mlp()
    model.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[counter, cb])
    watcher.join()
    # Training stood still at the end of epoch index max_queue while the writer was stuck.
    assert seen["ends"] == list(range(max_queue + 1))
    assert seen["captured"] == max_queue + 1  # initial + max_queue epochs; the next one waits
    assert seen["created"] == seen["in_use"] == max_queue + 1
    assert counts["peak_alive"] == max_queue + 1
    assert counts["captured"] == counts["handled"] == 6
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 1, 2, 3, 4]
    assert run.verify().ok


def test_fitting_twice_with_one_callback_appends_to_one_event_file(tmp_path):
    model = _cnn()
    run = str(tmp_path / "run")
    cb = WeightWatch(run)
    _fit(model, cb)
    files = os.listdir(os.path.join(run, "weights"))
    _fit(model, cb)
    assert os.listdir(os.path.join(run, "weights")) == files and len(files) == 1
    _fit(model, WeightWatch(run), epochs=1)  # another instance continuing the run
    assert os.listdir(os.path.join(run, "weights")) == files
    acc = _acc(run)
    assert sorted(_values(acc, "conv/kernel/l2_norm")) == [-1, 0, 1, 2, 3, 4]
    image = _kernel_tags(model, ["conv/kernel"])["conv/kernel"]
    assert sorted(_values(acc, image)) == [-1, 0, 1, 2, 3, 4]
    assert load_run(run).steps == [-1, 0, 1, 2, 3, 4]


EPOCHS = 4


def _fault_model():
    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="h"), keras.layers.Dense(1, name="o")]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _fault_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype("float32")
    return x, x[:, :1] * 2.0


def _committed(run: str) -> int:
    try:
        names = os.listdir(os.path.join(run, "snapshots"))
    except FileNotFoundError:
        return 0
    return sum(1 for n in names if n.endswith(".json") and not n.startswith("."))


class _Faulty:
    """A file object that fails its writes once `state.armed()` says so."""

    def __init__(self, f, fault):
        self._f = f
        self._fault = fault

    def write(self, data):
        if self._fault.armed():
            return self._fault.on_write(self._f, data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


class Fault:
    """Injects a fault into every file the package opens for writing under `run`."""

    kind = "none"

    def __init__(self, monkeypatch, run: str, after: int, at_train_begin: bool = False):
        self.run = os.path.abspath(run)
        self.after = after
        self.at_train_begin = at_train_begin
        self.fired = 0
        real_open = builtins.open

        def fake_open(file, mode="r", *args, **kwargs):
            writing = any(c in mode for c in "wxa+")
            inside = os.path.abspath(os.fspath(file)).startswith(self.run + os.sep)
            if writing and inside and self.armed():
                self.on_open(file)
            f = real_open(file, mode, *args, **kwargs)
            return _Faulty(f, self) if writing and inside else f

        for mod in (storage_mod, summaries_mod):
            monkeypatch.setattr(mod, "open", fake_open, raising=False)

    def armed(self) -> bool:
        header = os.path.join(self.run, "weightwatch.json")
        if not self.at_train_begin and not os.path.exists(header):
            return False  # the run header is written at train begin, before any snapshot
        return _committed(self.run) >= self.after

    def on_open(self, file) -> None:
        pass

    def on_write(self, f, data):
        return f.write(data)


class DiskFull(Fault):
    """ENOSPC part-way through the first write after `after` snapshots, and every one after."""

    kind = "disk full"

    def on_write(self, f, data):
        self.fired += 1
        n = memoryview(data).nbytes
        f.write(memoryview(data).cast("B")[: n // 2])  # a partial write, as a full disk does
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class PermissionRevoked(Fault):
    """EACCES when opening a file for writing, as after `chmod a-w` for a non-root user."""

    kind = "permission revoked"

    def on_open(self, file):
        self.fired += 1
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))


class _DeleteRunDir(keras.callbacks.Callback):
    """Deletes the run directory at the end of epoch `epoch` (placed before WeightWatch)."""

    def __init__(self, run: str, epoch: int, ww: WeightWatch):
        super().__init__()
        self.run, self.epoch, self.ww = run, epoch, ww

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.ww.pipeline.join()  # the earlier snapshots are complete
            shutil.rmtree(self.run)


def _fit_faulty(run, *, extra_first=(), epochs=EPOCHS, recorder=None, **kwargs):
    model = _fault_model()
    x, y = _fault_data()
    ww = WeightWatch(run, **kwargs)
    callbacks = [*extra_first, *([recorder] if recorder else []), ww]
    hist = model.fit(x, y, epochs=epochs, batch_size=16, verbose=0, callbacks=callbacks)
    return model, ww, hist


def _only_weightwatch(record) -> list[str]:
    msgs = [str(w.message) for w in record if issubclass(w.category, WeightWatchWarning)]
    others = [w for w in record if not issubclass(w.category, WeightWatchWarning)]
    assert not others, [str(w.message) for w in others]
    return msgs


@pytest.mark.parametrize("fault_cls, after, message", [
    (DiskFull, 2, r"No space left on device"),
    (DiskFull, 0, r"No space left on device"),
    (PermissionRevoked, 2, r"Permission denied"),
    (PermissionRevoked, 3, r"Permission denied"),
])
def test_write_fault_warns_once_and_fit_completes(tmp_path, monkeypatch, recorder,
                                                   fault_cls, after, message):
    run = str(tmp_path / "run")
    fault = fault_cls(monkeypatch, run, after=after)
    with pytest.warns(WeightWatchWarning) as record:
        model, ww, hist = _fit_faulty(run, recorder=recorder)
    assert len(hist.history["loss"]) == EPOCHS  # training went on to the end
    assert fault.fired >= 1
    msgs = _only_weightwatch(record)
    snap_msgs = [m for m in msgs if m.startswith("weightwatch: snapshots stopped")]
    assert len(snap_msgs) == 1, msgs
    assert re_search(message, snap_msgs[0])
    # A disk-full also stops the TensorBoard event file: once, not once per view.
    assert len(msgs) == len(set(msgs)) <= 2, msgs
    assert all("event file" in m or m in snap_msgs for m in msgs), msgs
    # Completed snapshots load, verify and equal get_weights(); the failed ones are invisible.
    loaded = load_run(run)
    assert loaded.verify().ok
    expected_steps = [-1, 0, 1, 2, 3][:after]
    assert loaded.steps == expected_steps
    for step in expected_steps:
        ref = recorder.initial if step == -1 else recorder.epochs[step]
        assert_same_arrays(loaded.weights(step), ref)
    leftovers = [n for d in ("tensors", "snapshots") for n in os.listdir(os.path.join(run, d))
                 if n.startswith(".tmp-")]
    assert leftovers == []  # the partial file of the failed write was removed
    # The run's lock was released: the same directory can be continued right away (a
    # resume at the run's next epoch: the model's weights moved on past its last snapshot).
    monkeypatch.undo()
    resume = expected_steps[-1] + 1 if expected_steps else 0
    x, y = _fault_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, epochs=resume + 1, initial_epoch=resume, batch_size=16, verbose=0,
                  callbacks=[WeightWatch(run)])
    assert load_run(run).steps == (expected_steps + [resume] if expected_steps else [-1, 0])


def re_search(pattern, text):

    return re.search(pattern, text) is not None


@pytest.mark.parametrize("fault_cls", [DiskFull, PermissionRevoked])
def test_strict_raises_on_a_write_fault(tmp_path, monkeypatch, recorder, fault_cls):
    run = str(tmp_path / "run")
    fault_cls(monkeypatch, run, after=2)
    # Whichever part writes next hits the fault first (the event file, for a full disk).
    with pytest.raises(WeightWatchError, match=r"weightwatch: .* failed: \[Errno (28|13)\]"):
        _fit_faulty(run, strict=True, recorder=recorder)
    monkeypatch.undo()
    loaded = load_run(run)
    assert loaded.steps == [-1, 0]
    assert loaded.verify().ok
    assert_same_arrays(loaded.weights(0), recorder.epochs[0])


def test_run_directory_deleted_mid_run(tmp_path, recorder):
    run = str(tmp_path / "run")
    model = _fault_model()
    x, y = _fault_data()
    ww = WeightWatch(run)
    with pytest.warns(WeightWatchWarning) as record:
        hist = model.fit(x, y, epochs=EPOCHS, batch_size=16, verbose=0,
                         callbacks=[_DeleteRunDir(run, 1, ww), recorder, ww])
    assert len(hist.history["loss"]) == EPOCHS
    msgs = _only_weightwatch(record)
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith("weightwatch: snapshots stopped")
    assert "No such file or directory" in msgs[0] and run in msgs[0]
    assert not os.path.exists(os.path.join(run, "weightwatch.json"))


def test_run_directory_deleted_mid_run_strict(tmp_path):
    run = str(tmp_path / "run")
    model = _fault_model()
    x, y = _fault_data()
    ww = WeightWatch(run, strict=True)
    with pytest.raises(WeightWatchError, match="snapshots failed"):
        model.fit(x, y, epochs=EPOCHS, batch_size=16, verbose=0,
                  callbacks=[_DeleteRunDir(run, 1, ww), ww])


def test_failing_view_stops_alone(tmp_path, monkeypatch, recorder):
    from keras_weightwatch import views

    def boom(*args, **kwargs):
        raise RuntimeError("histogram exploded")

    monkeypatch.setattr(views.HistogramView, "write", boom)
    run = str(tmp_path / "run")
    with pytest.warns(WeightWatchWarning) as record:
        _fit_faulty(run, recorder=recorder)
    msgs = _only_weightwatch(record)
    assert msgs == [
        "weightwatch: the histograms view stopped after an error (RuntimeError: histogram "
        "exploded); training goes on without it"
    ]
    loaded = load_run(run)
    assert loaded.steps == [-1, 0, 1, 2, 3]
    assert_same_arrays(loaded.weights("last"), recorder.epochs[EPOCHS - 1])


def test_fault_at_train_begin_warns_and_trains(tmp_path, monkeypatch):
    run = str(tmp_path / "run")
    fault = PermissionRevoked(monkeypatch, run, after=0, at_train_begin=True)
    with pytest.warns(WeightWatchWarning, match=r"Permission denied") as record:
        _, _, hist = _fit_faulty(run)
    assert len(hist.history["loss"]) == EPOCHS
    assert fault.fired >= 1
    assert len(_only_weightwatch(record)) == 1
    with pytest.raises(WeightWatchError, match="Permission denied"):
        _fit_faulty(run, strict=True)


# ------------------------------------------------------------------ a dropped view stops everywhere


class _JoinWorker(keras.callbacks.Callback):
    """Placed before WeightWatch: each epoch end waits until the worker wrote what it was given."""

    def __init__(self, ww):
        super().__init__()
        self.ww = ww
        self.views: list[list[str]] = []

    def on_epoch_end(self, epoch, logs=None):
        self.ww.pipeline.join()
        self.views.append([v.name for v in self.ww.pipeline.views])


def test_a_dropped_view_stops_everywhere_training_thread_included(tmp_path, monkeypatch):
    # An activation-response view runs a forward pass of a sub-model on the training thread
    # at every snapshot; once its `write` fails on the worker, that must stop too.
    calls = []
    real_capture = ResponseView.capture

    def capture(self, model):
        calls.append(len(calls))
        return real_capture(self, model)

    def boom(*args, **kwargs):
        raise RuntimeError("responses exploded")

    monkeypatch.setattr(ResponseView, "capture", capture)
    monkeypatch.setattr(ResponseView, "write", boom)
    model = _cnn(filters=2)
    model.compile(optimizer="sgd", loss="mse")
    run = str(tmp_path / "run")
    ww = WeightWatch(run, sample_images=np.ones((1, 8, 8, 1), "float32"),
                     response_mode="activation", kernel_images=False, health=None)
    join = _JoinWorker(ww)
    x, y = np.zeros((8, 8, 8, 1), "float32"), np.zeros((8, 2), "float32")
    with pytest.warns(WeightWatchWarning) as record:
        model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[join, ww])
    assert calls == [0]  # the initial snapshot's payload only: the view was off from then on
    assert join.views == [["stats", "histograms"]] * 3
    msgs = _only_weightwatch(record)
    assert msgs == [
        "weightwatch: the responses view stopped after an error (RuntimeError: responses "
        "exploded); training goes on without it"
    ]
    assert load_run(run).steps == [-1, 0, 1, 2]


# ------------------------------------------------------------------ a fake writer, no fit


class _FakeWriter:
    """What the pipeline needs of a `RunWriter`, in memory; its store fails at `fail_step`."""

    def __init__(self, path, specs, fail_step=None):
        self.path, self.specs, self.fail_step = path, tuple(specs), fail_step
        self.last_step = None
        self.committed: dict[int, tuple[dict, dict]] = {}
        self.closed = 0

    def has_initial(self):
        return False

    def previous(self, step):
        return None

    def store_tensors(self, snapshot):
        if snapshot.step == self.fail_step:
            raise OSError(28, "No space left on device")
        return {k: None for k in snapshot.arrays}

    def commit_snapshot(self, snapshot, records, stats):
        arrays = {k: np.array(a, copy=True) for k, a in snapshot.arrays.items()}
        self.committed[snapshot.step] = (arrays, stats)

    def close(self):
        self.closed += 1


@pytest.mark.parametrize("fail_step", [None, 0])
def test_pipeline_with_a_fake_writer(tmp_path, fail_step):
    from keras_weightwatch.fitplan import Plan
    from keras_weightwatch.settings import Settings

    model = _mlp()
    settings = Settings(tmp_path / "run", histograms=False)
    plan = Plan.make(model, settings)
    writer = _FakeWriter(str(tmp_path / "run"), plan.specs, fail_step)
    pipeline = Pipeline(writer, plan, settings)
    assert pipeline.needs_initial and pipeline.last_step is None
    expected = {}
    for step in (0, 1):
        model.layers[0].kernel.assign(np.full((4, 6), float(step + 1), "float32"))
        expected[step] = model.get_weights()
        pipeline.capture(model, step=step, epoch=step, logs={"loss": 1.0})
        pipeline.join()
        assert pipeline.last_step == step
    failures = pipeline.close()
    assert writer.closed == 1  # closed once: at the failure, or at close
    steps = [0, 1] if fail_step is None else []  # after a failed write the run stops
    assert sorted(writer.committed) == steps
    for step in steps:
        arrays, stats = writer.committed[step]
        assert_same_arrays(arrays, expected[step])
        kernel = expected[step][0].astype(np.float64)
        assert stats["base/kernel"]["l2_norm"] == pytest.approx(np.linalg.norm(kernel))
    assert [(part, str(e)) for part, e in failures] == (
        [] if fail_step is None else [("snapshots", "[Errno 28] No space left on device")]
    )
    # The views go on without the run: the statistics of both snapshots are in the event file.
    assert sorted(_values(_acc(str(tmp_path / "run")), "base/kernel/l2_norm")) == [0, 1]
    assert pipeline.pool.created == 0


# ------------------------------------------------------------------ host buffers


class _RecordingPool(BufferPool):
    """A pool that records, for each set it allocates, the thread and whether the training
    thread was inside `on_epoch_end` at that moment."""

    inside_epoch_end = threading.Event()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.allocations: list[tuple[str, bool]] = []

    def allocate(self, arrays):
        self.allocations.append(
            (threading.current_thread().name, _RecordingPool.inside_epoch_end.is_set()))
        return super().allocate(arrays)


class _PoolWatch(WeightWatch):
    """WeightWatch whose pipeline uses `_RecordingPool` (through `pipeline_class`), noting the
    sets that exist when each `on_epoch_end` begins."""

    class pipeline_class(Pipeline):  # noqa: N801 - the seam's own name
        pool_class = _RecordingPool

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sets_at_epoch_end: list[int] = []
        self.pools: list[_RecordingPool] = []

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.pools.append(self.pipeline.pool)

    def on_epoch_end(self, epoch, logs=None):
        self.sets_at_epoch_end.append(self.pipeline.pool.created)
        _RecordingPool.inside_epoch_end.set()
        try:
            super().on_epoch_end(epoch, logs)
        finally:
            _RecordingPool.inside_epoch_end.clear()


@pytest.mark.parametrize("initial", [True, False])
@pytest.mark.parametrize("here_bytes, second_by", [(64 << 20, "MainThread"), (0, "weightwatch")])
def test_the_second_buffer_set_exists_before_the_first_epoch_ends(
        tmp_path, monkeypatch, initial, here_bytes, second_by):
    """A small second set is made at train begin on the training thread; one larger than
    `PREFILL_HERE_BYTES` by the worker while the first epoch runs."""
    import keras_weightwatch.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "PREFILL_HERE_BYTES", here_bytes)
    x, y = _mlp_data()
    run = tmp_path / "run"
    model = _mlp()
    if not initial:  # a continued run takes no initial snapshot: the first set is made anyway
        model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[WeightWatch(run)])
    cb = _PoolWatch(run)
    model.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=[cb])
    (pool,) = cb.pools
    # Both sets exist (the second made or being made) when the first epoch ends...
    assert cb.sets_at_epoch_end == [2] * 5
    # ...the first on the training thread at train begin, the second where its size says;
    # none while an epoch end held the training thread.
    assert pool.allocations == [("MainThread", False), (second_by, False)]
    assert load_run(run).verify().ok


class _IdleAtEpochEnd(keras.callbacks.Callback):
    """Waits at each epoch end until the worker wrote everything (the worker keeps up)."""

    def __init__(self, cb):
        super().__init__()
        self.cb = cb

    def on_epoch_end(self, epoch, logs=None):
        if self.cb.pipeline is not None:
            self.cb.pipeline.join()


class _SeenAtFirstEpochEnd(keras.callbacks.Callback):
    """Placed before WeightWatch: at the first epoch end, waits until the run holds the
    initial snapshot, then notes the steps of the event file's statistics."""

    def __init__(self, run):
        super().__init__()
        self.run, self.steps = run, None

    def on_epoch_end(self, epoch, logs=None):
        if self.steps is None:
            deadline = time.monotonic() + 10
            while not (self.run / "snapshots" / "initial.json").exists():
                assert time.monotonic() < deadline, "the initial snapshot was never committed"
                time.sleep(0.01)
            events = self.run / "weights"  # made with the first summary written
            self.steps = sorted(_values(_acc(str(self.run)), "base/kernel/l2_norm")) if (
                events.exists() and os.listdir(events)) else []


def test_the_initial_snapshots_views_are_written_with_the_next_snapshot(tmp_path, recorder):
    """The initial snapshot is stored at once; its summaries come with the next snapshot's
    (the first epoch's start, Keras tracing the step, makes them cost twice the CPU)."""
    run = tmp_path / "run"
    probe = _SeenAtFirstEpochEnd(run)
    x, y = _mlp_data()
    _mlp().fit(x, y, epochs=2, batch_size=8, verbose=0,
               callbacks=[recorder, probe, WeightWatch(run)])
    assert probe.steps == []  # stored and committed, its views not yet written
    loaded = load_run(run)
    assert loaded.verify().ok
    assert_same_arrays(loaded.weights("initial"), recorder.initial)
    norms = _values(_acc(str(run)), "base/kernel/l2_norm")
    assert sorted(norms) == [-1, 0, 1]
    assert float(norms[-1]) == pytest.approx(np.linalg.norm(recorder.initial[0]), rel=1e-6)
    assert float(norms[0]) == pytest.approx(np.linalg.norm(recorder.epochs[0][0]), rel=1e-6)


def test_at_train_end_the_store_and_the_views_run_side_by_side(tmp_path, recorder):
    """The snapshot the training thread waits for at train end is stored on a second thread
    while the worker writes its views; its events reach the file after its commit."""
    log: list[tuple[str, int, str]] = []
    views_done = threading.Event()
    last = 2

    class SideBySide(Pipeline):
        def __init__(self, writer, plan, settings):
            store, commit = writer.store_tensors, writer.commit_snapshot

            def store_tensors(snapshot):
                log.append(("store", snapshot.step, threading.current_thread().name))
                return store(snapshot)

            def commit_snapshot(snapshot, *args):
                if snapshot.step == last:
                    views_done.wait(10)  # the views are written (held), not yet in the file
                    assert last not in _values(_acc(str(tmp_path / "run")), "base/kernel/l2_norm")
                commit(snapshot, *args)
                log.append(("commit", snapshot.step, threading.current_thread().name))

            writer.store_tensors, writer.commit_snapshot = store_tensors, commit_snapshot
            super().__init__(writer, plan, settings)

        def write(self, snapshot, payloads):
            if snapshot.step == last:
                self._draining.wait(10)  # the training thread is in `close`
            super().write(snapshot, payloads)

        def _write_views(self, snapshot, stats, payloads, flush=True):
            log.append(("views", snapshot.step, threading.current_thread().name))
            super()._write_views(snapshot, stats, payloads, flush)
            if snapshot.step == last:
                views_done.set()

    cb = WeightWatch(tmp_path / "run")
    cb.pipeline_class = SideBySide
    x, y = _mlp_data()
    _mlp().fit(x, y, epochs=last + 1, batch_size=8, verbose=0, callbacks=[recorder, cb])
    threads = {(part, step): name for part, step, name in log}
    for step in range(-1, last):
        assert {threads[(p, step)] for p in ("store", "commit", "views")} == {"weightwatch"}
    assert threads[("store", last)] == threads[("commit", last)] == "weightwatch-store"
    assert threads[("views", last)] == "weightwatch"
    run = load_run(tmp_path / "run")
    assert run.verify().ok
    assert_same_arrays(run.weights(last), recorder.epochs[last])
    stats = run.snapshot(last).stats["base/kernel"]
    assert stats["l2_norm"] == pytest.approx(np.linalg.norm(recorder.epochs[last][0]))
    norms = _values(_acc(str(tmp_path / "run")), "base/kernel/l2_norm")
    assert sorted(norms) == list(range(-1, last + 1))
    assert float(norms[last]) == pytest.approx(stats["l2_norm"], rel=1e-6)


def test_update_ratios_read_the_previous_snapshot_from_memory_not_from_disk(tmp_path, recorder):
    reads = []

    class CountingPipeline(Pipeline):
        def __init__(self, writer, plan, settings):
            read = writer.read
            writer.read = lambda rec: reads.append(rec) or read(rec)  # the run's one read
            super().__init__(writer, plan, settings)

    cb = WeightWatch(tmp_path / "run")
    cb.pipeline_class = CountingPipeline
    x, y = _mlp_data()
    _mlp().fit(x, y, epochs=4, batch_size=8, verbose=0,
               callbacks=[recorder, _IdleAtEpochEnd(cb), cb])
    assert reads == []  # every previous snapshot was still in the pool
    run = load_run(tmp_path / "run")
    snaps = {-1: recorder.initial, **recorder.epochs}
    for step in range(4):
        for i, key in enumerate(["base/kernel", "base/bias", "head/kernel", "head/bias"]):
            a, p = (s[i].astype(np.float64) for s in (snaps[step], snaps[step - 1]))
            expected = np.linalg.norm(a - p) / np.linalg.norm(p) if p.any() else np.nan
            got = run.snapshot(step).stats[key]["update_ratio"]
            if np.isfinite(expected):
                assert got == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------ a model-parallel process other than 0


class _JaxVariable:
    def __init__(self, value):
        self.value = value


class _JaxModel:
    """What `ShardPipeline` reads of a model: `weights`, each with a JAX `value`."""

    def __init__(self, value):
        self.weights = [_JaxVariable(value)]


def test_a_shard_process_writes_its_shards_on_its_worker_after_the_epoch_end(tmp_path,
                                                                              monkeypatch):
    """The training thread only copies the shards; the parts, their sums and the shard
    record are written by the worker, so `capture` (what `on_epoch_end` calls) returns while
    the write is still held back, and what is written is the value at the capture."""
    jnp = pytest.importorskip("jax.numpy")
    from helpers import sharded_model

    from keras_weightwatch.fitplan import Plan
    from keras_weightwatch.pipeline import ShardPipeline
    from keras_weightwatch.run import format as fmt
    from keras_weightwatch.settings import Settings
    from keras_weightwatch.stats import finish, tensor_stats

    run = tmp_path / "run"
    (run / "tensors").mkdir(parents=True)  # made by process 0's writer when it opens the run
    plan = Plan(sharded_model({"big/kernel": (6, 8)}), (), (0,), (0,), "a1")
    pipe = ShardPipeline(plan, Settings(str(run)))
    storage = pipe.writer.storage
    real, started, release = storage.write_atomic_many, threading.Event(), threading.Event()

    def held(*args, **kwargs):
        started.set()
        assert release.wait(30), "the test never released the write"
        return real(*args, **kwargs)

    monkeypatch.setattr(storage, "write_atomic_many", held)
    rng = np.random.default_rng(0)
    kernels = [rng.normal(size=(6, 8)).astype("float32") for _ in range(2)]
    model = _JaxModel(jnp.asarray(kernels[0]))
    try:
        pipe.capture(model, step=0, epoch=0, logs={})
        assert started.wait(10)
        model.weights[0].value = jnp.asarray(kernels[1])  # training moved on
        pipe.capture(model, step=1, epoch=1, logs={})  # queued behind the held write
        assert not (run / "shards").exists() or not os.listdir(run / "shards")
    finally:
        release.set()
        failures = pipe.close()
    assert failures == []
    for step, kernel in enumerate(kernels):
        with open(run / fmt.shard_record_name("epoch", step, 0)) as f:
            record = fmt.ShardRecord.from_json(json.load(f), "record")
        (part,) = record.tensors["big/kernel"]
        assert part.offset == (0, 0)
        assert np.load(run / part.file).tobytes() == kernel.tobytes()
        got = finish(record.stats["big/kernel"])
        want = tensor_stats(kernel, kernels[step - 1] if step else None)
        assert set(got) == set(want)
        for name, value in want.items():
            assert got[name] == pytest.approx(value, rel=1e-12), name


def test_a_frozen_weight_keeps_its_statistics_without_a_pass_over_it(tmp_path, monkeypatch):
    """A weight whose bytes did not change gets the statistics of the snapshot before (update
    ratio 0) without `tensor_stats` running over it again; every snapshot's stored statistics
    are still those of `tensor_stats` on the run's own tensors."""
    import keras_weightwatch.pipeline as pipeline_module
    from keras_weightwatch import WeightWatch, load_run
    from keras_weightwatch.stats import tensor_stats

    passes: list[tuple[int, ...]] = []
    real = pipeline_module.tensor_stats

    def counted(arr, prev=None):
        passes.append(np.shape(arr))
        return real(arr, prev)

    monkeypatch.setattr(pipeline_module, "tensor_stats", counted)
    keras.utils.set_random_seed(0)
    frozen = keras.layers.Dense(7, name="frozen", trainable=False)
    model = keras.Sequential([keras.Input((5,)), frozen, keras.layers.Dense(2, name="head")])
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(0).random((16, 5)).astype("float32")
    model.fit(x, x[:, :2], epochs=4, verbose=0, callbacks=[WeightWatch(str(tmp_path / "r"))])
    run = load_run(str(tmp_path / "r"))
    prev = None
    for snap in run.snapshots:
        arrays = run.weights(snap.step)
        for key, arr in arrays.items():
            want = tensor_stats(arr, None if prev is None else prev[key])
            assert {k: snap.stats[key][k] for k in want} == pytest.approx(want, rel=0, abs=0,
                                                                          nan_ok=True), key
        prev = arrays
    # the frozen kernel (5, 7) was reduced once, at the initial snapshot; the trained one at each
    assert len(run.snapshots) == 5
    assert passes.count((5, 7)) == 1 and passes.count((7, 2)) == 5
