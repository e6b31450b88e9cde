"""Mechanics behind the overhead targets (issue 5): no batch hooks, bounded queue and buffers,
worker errors that surface, a full drain at train end, retention, dedupe, reduced precision,
include/exclude. Tests, not timings: the timings are in benchmarks/."""

from __future__ import annotations

import io
import os
import re
import threading
import time
import warnings

import keras
import numpy as np
import pytest
from helpers import assert_same_arrays

from keras_weightwatch import WeightWatch, WeightWatchError, WeightWatchWarning, load_run
from keras_weightwatch import callback as callback_module
from keras_weightwatch.capture import BufferPool, describe_model
from keras_weightwatch.report import render_show
from keras_weightwatch.run import LocalStorage, RunWriter, retained_steps

BATCH_HOOKS = [
    f"on_{mode}_batch_{when}" for mode in ("train", "test", "predict") for when in ("begin", "end")
] + ["on_batch_begin", "on_batch_end"]


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


# ------------------------------------------------------------------ async batch dispatch


def test_no_batch_hooks_so_keras_keeps_async_dispatch(tmp_path):
    for hook in BATCH_HOOKS:
        assert getattr(WeightWatch, hook) is getattr(keras.callbacks.Callback, hook), hook
        assert hook not in WeightWatch.__dict__, hook
    from keras.src import backend
    from keras.src.callbacks.callback_list import CallbackList

    model = _mlp()
    with_ww = CallbackList([WeightWatch(tmp_path / "run")], model=model)
    without = CallbackList([], model=model)
    assert with_ww._async_train == without._async_train == bool(backend.IS_THREAD_SAFE)
    assert with_ww._async_test == without._async_test
    assert with_ww._async_predict == without._async_predict


# ------------------------------------------------------------------ bounded queue


@pytest.mark.parametrize("max_queue", [1, 2])
def test_slow_writer_makes_training_wait_instead_of_growing_memory(
    tmp_path, monkeypatch, max_queue
):
    gate = threading.Event()
    lock = threading.Lock()
    counts = {"captured": 0, "handled": 0, "peak_alive": 0}
    real_capture = callback_module.capture_into
    real_handle = callback_module._Pipeline._handle

    def capture(variables, pool):
        out = real_capture(variables, pool)
        with lock:
            counts["captured"] += 1
            counts["peak_alive"] = max(counts["peak_alive"], counts["captured"] - counts["handled"])
        return out

    def handle(self, snapshot, payloads):
        gate.wait(timeout=60)  # the writer is stuck until the test lets it go
        real_handle(self, snapshot, payloads)
        with lock:
            counts["handled"] += 1

    monkeypatch.setattr(callback_module, "capture_into", capture)
    monkeypatch.setattr(callback_module._Pipeline, "_handle", handle)
    counter = EpochCounter()
    cb = WeightWatch(tmp_path / "run", max_queue=max_queue)
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
            seen["created"] = cb._pool.created if cb._pool is not None else None
            seen["in_use"] = cb._pool.in_use if cb._pool is not None else None
            with lock:
                seen["captured"] = counts["captured"]
        finally:
            gate.set()

    watcher = threading.Thread(target=observe)
    watcher.start()
    x, y = _data()
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


def test_buffer_pool_bound_and_no_hang_when_the_worker_is_gone():
    pool = BufferPool(2, alive=lambda: False)
    assert pool.acquire() is None and pool.acquire() is None  # two sets may be created
    assert pool.created == 2 and pool.in_use == 2
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="worker thread has stopped"):
        pool.acquire()  # nothing will ever release a set: raise, never hang
    assert time.monotonic() - t0 < 5
    bufs = [np.zeros(3)]
    pool.release(bufs)
    assert pool.in_use == 1
    assert pool.acquire() is bufs
    with pytest.raises(ValueError, match="Received: max_sets=0"):
        BufferPool(0)


# ------------------------------------------------------------------ worker errors


def _failing_handle(monkeypatch, fail_step):
    real_handle = callback_module._Pipeline._handle

    def handle(self, snapshot, payloads):
        if snapshot.step == fail_step:
            raise RuntimeError(f"disk on fire at step {snapshot.step}")
        real_handle(self, snapshot, payloads)

    monkeypatch.setattr(callback_module._Pipeline, "_handle", handle)


class WaitForWorkerError(keras.callbacks.Callback):
    """Placed before WeightWatch: lets the worker finish failing before WeightWatch's hook runs."""

    def __init__(self, cb):
        super().__init__()
        self.cb = cb

    def on_epoch_end(self, epoch, logs=None):
        if epoch > 0:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            worker = self.cb._worker
            if worker is None or worker._errors:
                return
            time.sleep(0.01)


def test_worker_error_is_warned_at_the_next_epoch_by_default(tmp_path, monkeypatch):
    _failing_handle(monkeypatch, fail_step=-1)
    cb = WeightWatch(tmp_path / "run")
    after = EpochCounter()
    x, y = _data()
    with pytest.warns(WeightWatchWarning, match="disk on fire at step -1") as record:
        _mlp().fit(x, y, epochs=3, batch_size=8, verbose=0,
                   callbacks=[WaitForWorkerError(cb), cb, after])
    assert len([w for w in record if issubclass(w.category, WeightWatchWarning)]) == 1
    assert after.ends == [0, 1, 2]  # training went on
    assert not _worker_threads()
    run = load_run(tmp_path / "run")
    assert run.steps == [0, 1, 2]  # only the failed (initial) snapshot is missing
    assert run.verify().ok


def test_worker_error_is_raised_at_the_next_epoch_when_strict(tmp_path, monkeypatch):
    _failing_handle(monkeypatch, fail_step=-1)
    cb = WeightWatch(tmp_path / "run", strict=True)
    after = EpochCounter()
    x, y = _data()
    with pytest.raises(WeightWatchError, match="disk on fire at step -1"):
        _mlp().fit(x, y, epochs=3, batch_size=8, verbose=0,
                   callbacks=[WaitForWorkerError(cb), cb, after])
    assert after.ends == []  # raised in the first epoch end, before later callbacks ran
    assert not _worker_threads()
    assert cb._pool is None and cb._worker is None


@pytest.mark.parametrize("strict", [False, True])
def test_worker_error_in_the_last_snapshot_surfaces_at_train_end(tmp_path, monkeypatch, strict):
    _failing_handle(monkeypatch, fail_step=1)
    x, y = _data()
    cb = WeightWatch(tmp_path / "run", strict=strict)
    if strict:
        with pytest.raises(WeightWatchError, match="disk on fire at step 1"):
            _mlp().fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    else:
        with pytest.warns(WeightWatchWarning, match="disk on fire at step 1"):
            _mlp().fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert not _worker_threads()
    assert load_run(tmp_path / "run").steps == [-1, 0]


def test_train_end_writes_everything_before_returning(tmp_path, monkeypatch, recorder):
    real_handle = callback_module._Pipeline._handle

    def slow(self, snapshot, payloads):
        time.sleep(0.15)
        real_handle(self, snapshot, payloads)

    monkeypatch.setattr(callback_module._Pipeline, "_handle", slow)
    x, y = _data()
    model = _mlp()
    model.fit(x, y, epochs=4, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run", max_queue=4), recorder])
    assert not _worker_threads()
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 1, 2, 3]
    for epoch in range(4):
        assert_same_arrays(run.weights(epoch), recorder.epochs[epoch])
    assert run.verify().ok
    # The run's lock is released: another writer can open it at once.
    RunWriter.open(str(tmp_path / "run"), describe_model(model), settings={}, versions={}).close()


# ------------------------------------------------------------------ dedupe and retention


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


# ------------------------------------------------------------------ reduced precision

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


# ------------------------------------------------------------------ include / exclude


def test_include_exclude_filter_what_is_stored_and_viewed(tmp_path):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea

    x, y = _data()
    model = _mlp()
    cb = WeightWatch(tmp_path / "run", include=["^head", "base/kernel"], exclude="bias$")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    run = load_run(tmp_path / "run")
    assert [s.key for s in run.specs] == ["base/kernel", "head/kernel"]
    for snap in run.snapshots:
        assert sorted(snap.tensors) == ["base/kernel", "head/kernel"]
        assert sorted(snap.stats) == ["base/kernel", "head/kernel"]
    np.testing.assert_array_equal(run.weights()["head/kernel"], model.layers[1].get_weights()[0])
    acc = pea.EventAccumulator(str(tmp_path / "run" / "weights"),
                               size_guidance={pea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    assert any(t.startswith("head/kernel/") for t in tags)
    assert not any("bias" in t for t in tags)
    assert run.model["total_params"] == model.count_params()  # the header still describes all
    assert cb.get_config()["include"] == ["^head", "base/kernel"]
    assert cb.get_config()["exclude"] == ["bias$"]


def test_a_filter_that_leaves_nothing_is_refused_at_train_begin(tmp_path):
    x, y = _data()
    with pytest.raises(ValueError, match="leave none of the model's 4 weights"):
        _mlp().fit(x, y, epochs=1, verbose=0,
                   callbacks=[WeightWatch(tmp_path / "run", include="no_such_layer")])
    assert not _worker_threads()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"store_dtype": "int8"}, ValueError, "Received: store_dtype='int8'"),
        ({"store_dtype": "float32"}, ValueError, "`store_dtype` must be one of"),
        ({"keep_last": 0}, ValueError, "Received: keep_last=0"),
        ({"keep_last": 1.5}, TypeError, "Received: keep_last=1.5"),
        ({"keep_every": 2}, ValueError, "`keep_every` needs `keep_last`"),
        ({"keep_last": 3, "keep_every": 0}, ValueError, "Received: keep_every=0"),
        ({"include": 5}, TypeError, "Received: include=5"),
        ({"include": []}, ValueError, "must not be an empty list"),
        ({"exclude": ["ok", 3]}, TypeError, "must hold only strings"),
        ({"exclude": "dense(["}, ValueError, "not a valid regular expression"),
    ],
)
def test_new_arguments_are_validated(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        WeightWatch(tmp_path / "run", **kwargs)


def test_new_arguments_in_config_with_defaults(tmp_path):
    config = WeightWatch(tmp_path / "run").get_config()
    assert {k: config[k] for k in ("store_dtype", "keep_last", "keep_every", "include",
                                   "exclude", "max_queue")} == {
        "store_dtype": None, "keep_last": None, "keep_every": None, "include": None,
        "exclude": None, "max_queue": 1,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WeightWatch(tmp_path / "run", store_dtype="bfloat16", include="dense")
