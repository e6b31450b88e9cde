"""WeightWatch, the callback: its hooks, the steps it gives snapshots, what it reports and when,
models of every shape, several fits of one callback. Every snapshot is compared with
`get_weights()` (recorded by an independent callback) bit for bit."""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import pytest
from fit_helpers import EpochCounter, _data, _mlp, _worker_threads
from helpers import assert_same_arrays

from keras_weightwatch import WeightWatch, WeightWatchError, WeightWatchWarning, load_run
from keras_weightwatch.capture import describe_model
from keras_weightwatch.pipeline import Pipeline
from keras_weightwatch.run import RunWriter

BATCH_HOOKS = [
    f"on_{mode}_batch_{when}" for mode in ("train", "test", "predict") for when in ("begin", "end")
] + ["on_batch_begin", "on_batch_end"]


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
    # batch_freq=None (the default) is the same callback; batch_freq=N adds one batch hook.
    assert "on_train_batch_end" not in vars(WeightWatch(tmp_path / "run", batch_freq=None))
    on = WeightWatch(tmp_path / "run", batch_freq=3)
    assert [h for h in BATCH_HOOKS if getattr(on, h).__func__ is not getattr(
        keras.callbacks.Callback, h)] == ["on_train_batch_end"]
    assert CallbackList([on], model=model)._async_train is False


def _failing_pipeline(fail_step):
    """A pipeline whose writing fails at one step (passed through `WeightWatch.pipeline_class`)."""

    class FailingPipeline(Pipeline):
        made: list[Pipeline] = []

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.made.append(self)

        def write(self, snapshot, payloads):
            if snapshot.step == fail_step:
                raise RuntimeError(f"disk on fire at step {snapshot.step}")
            super().write(snapshot, payloads)

    return FailingPipeline


def _failing(cb, fail_step):
    cb.pipeline_class = _failing_pipeline(fail_step)
    return cb


class WaitForWorkerError(keras.callbacks.Callback):
    """Placed before WeightWatch: lets the worker finish failing before WeightWatch's hook runs."""

    def __init__(self, cb):
        super().__init__()
        self.cb = cb

    def on_epoch_end(self, epoch, logs=None):
        if epoch > 0:
            return
        if self.cb.pipeline is not None:
            self.cb.pipeline.join()  # the initial snapshot (the only one queued) is handled


def test_worker_error_is_warned_at_the_next_epoch_by_default(tmp_path):
    cb = _failing(WeightWatch(tmp_path / "run"), fail_step=-1)
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


def test_worker_error_is_raised_at_the_next_epoch_when_strict(tmp_path):
    cb = _failing(WeightWatch(tmp_path / "run", strict=True), fail_step=-1)
    after = EpochCounter()
    x, y = _data()
    with pytest.raises(WeightWatchError, match="disk on fire at step -1"):
        _mlp().fit(x, y, epochs=3, batch_size=8, verbose=0,
                   callbacks=[WaitForWorkerError(cb), cb, after])
    assert after.ends == []  # raised in the first epoch end, before later callbacks ran
    assert not _worker_threads()
    assert cb.pipeline is None  # the fit's pipeline is gone...
    (pipeline,) = cb.pipeline_class.made
    assert pipeline.pool.created == 0  # ...and gave its buffers back


@pytest.mark.parametrize("strict", [False, True])
def test_worker_error_in_the_last_snapshot_surfaces_at_train_end(tmp_path, strict):
    x, y = _data()
    cb = _failing(WeightWatch(tmp_path / "run", strict=strict), fail_step=1)
    if strict:
        with pytest.raises(WeightWatchError, match="disk on fire at step 1"):
            _mlp().fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    else:
        with pytest.warns(WeightWatchWarning, match="disk on fire at step 1"):
            _mlp().fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert not _worker_threads()
    assert load_run(tmp_path / "run").steps == [-1, 0]


def test_train_end_writes_everything_before_returning(tmp_path, recorder):
    class SlowPipeline(Pipeline):
        def write(self, snapshot, payloads):
            time.sleep(0.15)
            super().write(snapshot, payloads)

    x, y = _data()
    model = _mlp()
    cb = WeightWatch(tmp_path / "run", max_queue=4)
    cb.pipeline_class = SlowPipeline
    model.fit(x, y, epochs=4, batch_size=8, verbose=0, callbacks=[cb, recorder])
    assert not _worker_threads()
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 1, 2, 3]
    for epoch in range(4):
        assert_same_arrays(run.weights(epoch), recorder.epochs[epoch])
    assert run.verify().ok
    # The run's lock is released: another writer can open it at once.
    RunWriter.open(str(tmp_path / "run"), describe_model(model), settings={}, versions={}).close()


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


@pytest.mark.filterwarnings("ignore:The model does not have any trainable weights")
def test_layer_with_no_weights_at_all(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Flatten(),
                              keras.layers.Activation("relu")])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((4, 3)), np.ones((4, 3)), epochs=2, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run")])
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 1]
    assert run.weights("last") == {}
    assert run.verify().ok


def test_1000_layers(tmp_path):
    inp = keras.Input((2,))
    outs = [keras.layers.Dense(1, name=f"d{i}")(inp) for i in range(1000)]
    model = keras.Model(inp, keras.layers.Concatenate(name="cat")(outs))
    assert len(model.layers) == 1002
    ww = WeightWatch(tmp_path / "run", histograms=False, durable=False)
    # The hooks fit calls, without fit's tracing of 1000 branches (slow, not what is tested).
    ww.set_model(model)
    ww.on_train_begin()
    ww.on_epoch_begin(0)
    before = [np.array(w) for w in model.get_weights()]
    model.layers[500].kernel.assign(np.full((2, 1), 7.0, "float32"))
    # The one kernel that moved, while the 999 others did not: the health rules say so.
    with pytest.warns(WeightWatchWarning, match="large_update in layer 'd499' at step 0"):
        ww.on_epoch_end(0, {"loss": 1.0})
        ww.on_train_end()
    run = load_run(tmp_path / "run")
    assert len(run.specs) == 2000 and len(run.layers) == 1002
    assert_same_arrays(run.weights("initial"), before)
    assert_same_arrays(run.weights(0), model.get_weights())
    assert run.tensor("d499/kernel", 0).tolist() == [[7.0], [7.0]]
    assert run.verify().ok


def test_model_changed_between_fits(tmp_path, recorder):
    keras.utils.set_random_seed(22)
    x, y = _data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"),
                              keras.layers.Dense(1, name="b")])
    model.compile(optimizer="adam", loss="mse")
    ww = WeightWatch(tmp_path / "run")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[ww])
    # Freezing a layer keeps the architecture: the same run continues, flags follow.
    model.layers[0].trainable = False
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=2, verbose=0, callbacks=[ww, recorder])
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 1, 2, 3]
    assert_same_arrays(run.weights(3), recorder.epochs[1])
    assert {s.key: s.trainable for s in run.specs}["a/kernel"] is False
    np.testing.assert_array_equal(run.tensor("a/kernel", 1), run.tensor("a/kernel", 3))
    # A layer added: the same callback starts a new run beside it, with one warning...
    bigger = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2),
                               keras.layers.Dense(1)])
    bigger.compile(optimizer="adam", loss="mse")
    with pytest.warns(WeightWatchWarning, match=r"another architecture \(the run has 4 weight "
                                                r"tensors, the model has 6; "):
        bigger.fit(x, y, epochs=1, verbose=0, callbacks=[ww])
    assert ww.run_dir == os.fspath(tmp_path / "run") + "-2"
    assert load_run(tmp_path / "run").steps == [-1, 0, 1, 2, 3]  # untouched
    # ...and so does one with if_exists="new", silently.
    ww_new = WeightWatch(tmp_path / "run", if_exists="new")
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ww_new])
    assert ww_new.run_dir == os.fspath(tmp_path / "run") + "-3"
    rec2 = type(recorder)()
    bigger.fit(x, y, epochs=1, verbose=0, callbacks=[ww_new, rec2])
    assert ww_new.run_dir == os.fspath(tmp_path / "run") + "-4"
    assert_same_arrays(load_run(ww_new.run_dir).weights(0), rec2.epochs[0])
    assert load_run(tmp_path / "run-3").steps == [-1, 0]


class _BatchRecorder(keras.callbacks.Callback):
    """The reference: get_weights() before training and after every training batch, keyed by
    the number of batches trained in the fit."""

    def __init__(self):
        super().__init__()
        self.after: dict[int, list[np.ndarray]] = {}
        self._n = 0

    def on_train_begin(self, logs=None):
        self.after[0] = self.model.get_weights()

    def on_train_batch_end(self, batch, logs=None):
        self._n += 1
        self.after[self._n] = self.model.get_weights()


def _event_steps(path, tag):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea

    acc = pea.EventAccumulator(str(path), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return [e.step for e in acc.Tensors(tag)]


def test_batch_freq_snapshots_line_up_with_tensorboard_update_freq(tmp_path):
    x, y = _data(n=40)  # 5 batches of 8 per epoch
    run = tmp_path / "run"
    ref = _BatchRecorder()
    tb = keras.callbacks.TensorBoard(str(run), update_freq=2)
    _mlp().fit(x, y, epochs=3, batch_size=8, verbose=0,
               callbacks=[ref, WeightWatch(run, batch_freq=2), tb])
    loaded = load_run(run)
    # Steps count training batches: every 2nd batch, each epoch's last batch (5, 10, 15),
    # the initial weights at 0; the epoch snapshot at 10 stands for batch 10 too.
    assert loaded.steps == [0, 2, 4, 5, 6, 8, 10, 12, 14, 15]
    assert [s.label for s in loaded.snapshots] == (
        ["initial"] + ["batch", "batch", "epoch"] * 3)
    assert loaded.epochs == [5, 10, 15]
    assert [s.epoch for s in loaded.snapshots[1:]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for step in loaded.steps:
        assert_same_arrays(loaded.weights(step), ref.after[step])
    # TensorBoard's own batch-level steps are among ours, in TensorBoard's own reader; every
    # WeightWatch tag holds all of them, strictly increasing (none is lost by the loader).
    tb_steps = _event_steps(run / "train", "batch_loss")
    assert tb_steps == [2, 4, 6, 8, 10, 12, 14]
    ww_steps = _event_steps(run / "weights", "base/kernel/l2_norm")
    assert ww_steps == loaded.steps and set(tb_steps) <= set(ww_steps)


def test_batch_freq_steps_continue_in_a_second_fit(tmp_path):
    x, y = _data(n=24)  # 3 batches of 8 per epoch
    model = _mlp()
    cb = WeightWatch(tmp_path / "run", batch_freq=2)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    assert load_run(tmp_path / "run").steps == [0, 2, 3, 4, 6]
    ref = _BatchRecorder()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[ref, cb])
    loaded = load_run(tmp_path / "run")
    # The optimizer counted 6 batches: the second fit goes on from there.
    assert loaded.steps == [0, 2, 3, 4, 6, 8, 9]
    assert_same_arrays(loaded.weights(8), ref.after[2])
    assert_same_arrays(loaded.weights(9), ref.after[3])
