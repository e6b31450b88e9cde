"""The run directory as the callback writes it: dedupe, retention, reduced precision, the lock
against a second writer."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from fit_helpers import _data, _mlp
from helpers import assert_same_arrays

from keras_weightwatch import WeightWatch, WeightWatchWarning, load_run
from keras_weightwatch.capture import describe_model
from keras_weightwatch.report import render_show
from keras_weightwatch.run import LocalStorage, RunWriter, retained_steps


def _npy_bytes(arr):
    bio = io.BytesIO()
    np.save(bio, np.ascontiguousarray(arr), allow_pickle=False)
    return bio.getvalue()


def _tensor_files(run_dir):
    d = os.path.join(run_dir, "tensors")
    return {f: os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)}


def test_dedupe_stores_each_distinct_tensor_once(tmp_path, recorder):
    x, y = _data()
    model = _mlp(frozen=True)
    model.fit(x, y, epochs=3, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run"), recorder])
    every = [recorder.initial] + [recorder.epochs[e] for e in range(3)]
    distinct = {_npy_bytes(a) for arrays in every for a in arrays}
    files = _tensor_files(tmp_path / "run")
    assert len(files) == len(distinct)
    assert sum(files.values()) == sum(len(b) for b in distinct)
    # The frozen layer's two tensors cost their bytes once; the head changes every epoch.
    run = load_run(tmp_path / "run")
    assert len({s.tensors["base/kernel"].file for s in run.snapshots}) == 1
    assert len({s.tensors["head/kernel"].file for s in run.snapshots}) == 4


def test_retention_keeps_last_n_every_mth_and_initial_and_exactly_their_bytes(tmp_path, recorder):
    x, y = _data()
    model = _mlp()
    cb = WeightWatch(tmp_path / "run", keep_last=2, keep_every=3)
    model.fit(x, y, epochs=8, batch_size=8, verbose=0, callbacks=[cb, recorder])
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 3, 6, 7]
    assert sorted(os.listdir(tmp_path / "run" / "snapshots")) == [
        "epoch_000000.json", "epoch_000003.json", "epoch_000006.json", "epoch_000007.json",
        "initial.json",
    ]
    assert_same_arrays(run.weights("initial"), recorder.initial)
    for epoch in (0, 3, 6, 7):
        assert_same_arrays(run.weights(epoch), recorder.epochs[epoch])
    kept = [recorder.initial] + [recorder.epochs[e] for e in (0, 3, 6, 7)]
    distinct = {_npy_bytes(a) for arrays in kept for a in arrays}
    files = _tensor_files(tmp_path / "run")
    assert len(files) == len(distinct)
    assert sum(files.values()) == sum(len(b) for b in distinct)
    assert run.verify().ok
    assert cb.get_config()["keep_last"] == 2 and cb.get_config()["keep_every"] == 3


def test_retained_steps_policy():
    from keras_weightwatch.run import SnapshotRecord

    def rec(step, label="epoch"):
        return SnapshotRecord(step, label, None, 0.0, {}, {}, {}, f"snapshots/{step}")

    snaps = [rec(-1, "initial")] + [rec(s) for s in range(10)]
    assert retained_steps(snaps, 3) == {-1, 7, 8, 9}
    assert retained_steps(snaps, 1, 4) == {-1, 0, 4, 8, 9}
    assert retained_steps(snaps, 20) == set(range(-1, 10))


def _fit_run(tmp_path, epochs=5):
    x, y = _data()
    model = _mlp()
    model.fit(x, y, epochs=epochs, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run", durable=False)])
    return model


@pytest.mark.parametrize("kill_after_unlinks", [1, 2, 4, 6])
def test_retention_killed_at_any_moment_leaves_a_run_that_loads_and_verifies(
    tmp_path, kill_after_unlinks
):
    model = _fit_run(tmp_path)
    path = str(tmp_path / "run")
    before = load_run(path)
    calls = []

    class Killed(BaseException):
        pass

    class KilledAfterUnlinks(LocalStorage):
        """The run's storage, with the process killed at its next file removal."""

        def remove(self, name):
            if len(calls) == kill_after_unlinks:
                raise Killed
            calls.append(name)
            return super().remove(name)

    writer = RunWriter.open(path, describe_model(model), settings={}, versions={}, durable=False,
                            storage=KilledAfterUnlinks(path))
    try:
        writer.apply_retention(keep_last=1)
    except Killed:
        pass
    finally:
        writer.close()
    run = load_run(path)
    assert run.verify().ok
    assert set(run.steps) <= set(before.steps) and {-1, 4} <= set(run.steps)
    for step in run.steps:
        for key, arr in run.weights(step).items():
            np.testing.assert_array_equal(arr, before.weights(step)[key])
    # The next pass finishes the job: only what the kept snapshots reference remains.
    writer = RunWriter.open(path, describe_model(model), settings={}, versions={}, durable=False)
    writer.apply_retention(keep_last=1)
    writer.close()
    run = load_run(path)
    assert run.steps == [-1, 4]
    referenced = {os.path.basename(r.file) for s in run.snapshots for r in s.tensors.values()}
    assert set(_tensor_files(path)) == referenced
    assert run.verify().ok


TOLERANCE = {"float16": (2.0**-11, 2.0**-25), "bfloat16": (2.0**-8, 0.0)}  # (relative, absolute)


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_reduced_precision_loads_back_within_tolerance(tmp_path, recorder, store_dtype):
    x, y = _data()
    model = _mlp()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run", store_dtype=store_dtype), recorder])
    run = load_run(tmp_path / "run")
    rel, absolute = TOLERANCE[store_dtype]
    differs = False
    for step, exact in [("initial", recorder.initial), (0, recorder.epochs[0]),
                        (1, recorder.epochs[1])]:
        got = run.weights(step)
        for (key, a), b in zip(got.items(), exact):
            assert a.dtype == b.dtype == np.float32, key  # loads back as get_weights' dtype
            assert a.shape == b.shape, key
            err = np.abs(a.astype(np.float64) - b.astype(np.float64))
            assert np.all(err <= rel * np.abs(b.astype(np.float64)) + absolute), key
            differs |= bool(np.any(err > 0))
            rec = run.snapshot(step).tensors[key]
            assert rec.lossy and rec.stored_dtype == store_dtype
            assert rec.bytes == len(_npy_bytes(np.zeros(b.shape, np.float16)))  # 2 bytes each
    assert differs  # it really is lossy
    assert run.settings["store_dtype"] == store_dtype
    assert f"precision LOSSY: float weights stored as {store_dtype}" in render_show(run)
    assert run.verify().ok


def _odd_data(n=16, d=4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype("float32")
    return x, x[:, :1] * 3.0


LOCK_PROBE = r'''
import sys
from keras_weightwatch.capture import ModelInfo
from keras_weightwatch.errors import WeightWatchError
from keras_weightwatch.run import RunWriter
try:
    RunWriter.open(sys.argv[1], ModelInfo("m", "M", (), ()), settings={}, versions={})
except WeightWatchError as e:
    print(e)
    sys.exit(3)
sys.exit(0)
'''


class _SecondWriters(keras.callbacks.Callback):
    """While the first WeightWatch holds the run (mid-fit), other writers try the same dir."""

    def __init__(self, run, other_model):
        super().__init__()
        self.run, self.other = run, other_model
        self.results = {}

    def on_epoch_end(self, epoch, logs=None):
        if epoch != 0:
            return
        probe = subprocess.run([sys.executable, "-c", LOCK_PROBE, self.run],
                               capture_output=True, text=True, timeout=60)
        self.results["process"] = (probe.returncode, probe.stdout.strip())
        second = WeightWatch(self.run)  # another architecture: a run of its own, never the lock
        second.set_model(self.other)
        with pytest.warns(WeightWatchWarning, match="another architecture") as said:
            second.on_train_begin()
            second.on_train_end()
        self.results["callback"] = (second.run_dir, len(said))
        new = WeightWatch(self.run, if_exists="new")
        new.set_model(self.other)
        new.on_train_begin()
        new.on_epoch_begin(0)
        new.on_epoch_end(0, {"loss": 2.0})
        new.on_train_end()
        self.results["new"] = new.run_dir


def test_second_writer_gets_a_lock_error_or_its_own_run(tmp_path, recorder):
    keras.utils.set_random_seed(23)
    x, y = _data()
    run = str(tmp_path / "run")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    other.build((None, 4))
    probe = _SecondWriters(run, other)
    model.fit(x, y, epochs=2, verbose=0, callbacks=[recorder, WeightWatch(run), probe])
    code, out = probe.results["process"]
    assert code == 3, out
    assert out == (f"{run}: the run is being written by another WeightWatch (pid {os.getpid()}); "
                   "give each writer its own log_dir, or pass if_exists='new'")
    assert probe.results["callback"] == (run + "-2", 1)
    assert probe.results["new"] == run + "-3"
    # No interleaving: each run holds only its own model's weights.
    first = load_run(run)
    assert first.steps == [-1, 0, 1] and first.verify().ok
    assert_same_arrays(first.weights(1), recorder.epochs[1])
    second = load_run(run + "-3")
    assert [s.shape for s in second.specs] == [(4, 1), (1,)]
    assert_same_arrays(second.weights(0), other.get_weights())
    # Once the first writer is done, the lock is free again (the probe's empty model is
    # then refused for its architecture, not for the lock).
    again = subprocess.run([sys.executable, "-c", LOCK_PROBE, run], capture_output=True,
                           text=True, timeout=60)
    assert "another architecture" in again.stdout and "being written" not in again.stdout
    # The lock file exists only while a writer holds it: closed runs keep none.
    for d in (run, run + "-2", run + "-3"):
        assert not os.path.exists(os.path.join(d, ".weightwatch.lock")), d


def test_new_run_beside_a_writer_that_has_the_lock_but_no_header_yet(tmp_path):
    # The race of two writers starting at once: the first holds the directory's lock but
    # has not written its header. if_exists="new" starts beside it; "continue" is refused.
    from keras_weightwatch.errors import RunBusyError
    from keras_weightwatch.run import LocalStorage, RunLock

    run = str(tmp_path / "run")
    os.makedirs(run)
    (tmp_path / "run-2").mkdir()  # taken by somebody else: the next free one is -3
    lock = RunLock(LocalStorage(run))
    lock.acquire()
    try:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.build((None, 4))
        busy = WeightWatch(run)
        busy.set_model(model)
        with pytest.raises(RunBusyError, match="being written by another WeightWatch"):
            busy.on_train_begin()
        new = WeightWatch(run, if_exists="new")
        new.set_model(model)
        new.on_train_begin()
        new.on_epoch_begin(0)
        new.on_epoch_end(0, {"loss": 1.0})
        new.on_train_end()
    finally:
        lock.release()
    assert new.run_dir == run + "-3"
    assert_same_arrays(load_run(run + "-3").weights(0), model.get_weights())
    assert os.listdir(tmp_path / "run-2") == []  # untouched
    assert not os.path.exists(os.path.join(run, "weightwatch.json"))
