"""Faults while writing: training never dies because of monitoring (issue 7).

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
import os
import shutil
import warnings

import keras
import numpy as np
import pytest
from helpers import assert_same_arrays

from keras_weightwatch import WeightWatch, WeightWatchError, WeightWatchWarning, load_run
from keras_weightwatch import summaries as summaries_mod
from keras_weightwatch.run import storage as storage_mod

EPOCHS = 4


def _model():
    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3, name="h"), keras.layers.Dense(1, name="o")]
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


def _data():
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
            self.ww._worker._queue.join()  # the earlier snapshots are complete
            shutil.rmtree(self.run)


def _fit(run, *, extra_first=(), epochs=EPOCHS, recorder=None, **kwargs):
    model = _model()
    x, y = _data()
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
        model, ww, hist = _fit(run, recorder=recorder)
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
    # The run's lock was released: the same directory can be continued right away.
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fit(run, epochs=1)
    assert load_run(run).steps == (expected_steps + [expected_steps[-1] + 1] if expected_steps
                                   else [-1, 0])


def re_search(pattern, text):
    import re

    return re.search(pattern, text) is not None


@pytest.mark.parametrize("fault_cls", [DiskFull, PermissionRevoked])
def test_strict_raises_on_a_write_fault(tmp_path, monkeypatch, recorder, fault_cls):
    run = str(tmp_path / "run")
    fault_cls(monkeypatch, run, after=2)
    # Whichever part writes next hits the fault first (the event file, for a full disk).
    with pytest.raises(WeightWatchError, match=r"weightwatch: .* failed: \[Errno (28|13)\]"):
        _fit(run, strict=True, recorder=recorder)
    monkeypatch.undo()
    loaded = load_run(run)
    assert loaded.steps == [-1, 0]
    assert loaded.verify().ok
    assert_same_arrays(loaded.weights(0), recorder.epochs[0])


def test_run_directory_deleted_mid_run(tmp_path, recorder):
    run = str(tmp_path / "run")
    model = _model()
    x, y = _data()
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
    model = _model()
    x, y = _data()
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
        _fit(run, recorder=recorder)
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
        _, _, hist = _fit(run)
    assert len(hist.history["loss"]) == EPOCHS
    assert fault.fired >= 1
    assert len(_only_weightwatch(record)) == 1
    with pytest.raises(WeightWatchError, match="Permission denied"):
        _fit(run, strict=True)
