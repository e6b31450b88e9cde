"""Re-runs: which fits continue a run, and which start a new one beside it.

A fit continues a run when it starts where the run left off (the weights of its
last snapshot, `initial_epoch > 0`, or the model this callback watched last);
any other fit at `initial_epoch=0` is a new training and goes to `log_dir-2`
with one warning. References: `get_weights()` recorded by an independent
callback, and the run's own files, byte for byte, before and after.
"""

from __future__ import annotations

import os
import warnings

import keras
import numpy as np
import pytest
from helpers import assert_same_arrays
from tiny_models import data

from keras_weightwatch import (
    WeightWatch,
    WeightWatchError,
    WeightWatchWarning,
    drift,
    load_run,
)
from keras_weightwatch.report import render_show


def _model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="a"),
                              keras.layers.Dense(1, name="b")])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _files(run_dir):
    """Every file of a run (events aside) and its bytes: what 'untouched' means."""
    out = {}
    for sub in ("snapshots", "tensors"):
        for name in sorted(os.listdir(os.path.join(run_dir, sub))):
            with open(os.path.join(run_dir, sub, name), "rb") as f:
                out[f"{sub}/{name}"] = f.read()
    return out


def _fit(model, callbacks, epochs=2, **kwargs):
    """fit, returning the WeightWatchWarnings it gave (any other warning is an error)."""
    x, y = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WeightWatchWarning)
        model.fit(x, y, epochs=epochs, batch_size=8, verbose=0, callbacks=callbacks, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, WeightWatchWarning)]


@pytest.fixture
def first(tmp_path):
    """A run of 3 epochs (steps -1..2) by a model seeded 1: (run dir, model, its files)."""
    run_dir = os.fspath(tmp_path / "run")
    model = _model(1)
    assert _fit(model, [WeightWatch(run_dir)], epochs=3) == []
    return run_dir, model, _files(run_dir)


# ------------------------------------------------------------------ fits that continue


def test_initial_epoch_above_zero_continues_even_from_other_weights(first, recorder):
    run_dir, _, _ = first
    other = _model(2)  # other weights than the run's last snapshot: a resume the user asks for
    assert _fit(other, [WeightWatch(run_dir), recorder], epochs=5, initial_epoch=3) == []
    run = load_run(run_dir)
    assert run.steps == [-1, 0, 1, 2, 3, 4]
    assert_same_arrays(run.weights(4), recorder.epochs[4])
    assert not os.path.exists(run_dir + "-2")


def test_a_second_fit_of_the_same_model_continues_with_a_new_callback(first, recorder):
    run_dir, model, before = first
    assert _fit(model, [WeightWatch(run_dir), recorder]) == []
    run = load_run(run_dir)
    assert run.steps == [-1, 0, 1, 2, 3, 4] and [s.epoch for s in run.snapshots][-2:] == [0, 1]
    assert_same_arrays(run.weights(4), recorder.epochs[1])
    assert all(_files(run_dir)[name] == data for name, data in before.items())
    assert not os.path.exists(run_dir + "-2")


def test_the_same_callback_and_model_continue_even_after_the_weights_moved(tmp_path, recorder):
    # EarlyStopping(restore_best_weights=True) sets older weights after the last snapshot.
    run_dir = os.fspath(tmp_path / "run")
    model, cb = _model(1), WeightWatch(tmp_path / "run")
    _fit(model, [cb])
    model.set_weights([w + 1.0 for w in model.get_weights()])
    assert _fit(model, [cb, recorder]) == []
    assert cb.run_dir == run_dir and load_run(run_dir).steps == [-1, 0, 1, 2, 3]
    assert_same_arrays(load_run(run_dir).weights(3), recorder.epochs[1])


def test_a_restored_checkpoint_equal_to_the_last_snapshot_continues(first, tmp_path, recorder):
    run_dir, model, _ = first
    checkpoint = os.fspath(tmp_path / "last.weights.h5")
    model.save_weights(checkpoint)
    restored = _model(7)  # a new process would build it afresh, then load the checkpoint
    restored.load_weights(checkpoint)
    assert _fit(restored, [WeightWatch(run_dir), recorder]) == []
    run = load_run(run_dir)
    assert run.steps == [-1, 0, 1, 2, 3, 4]
    assert_same_arrays(run.weights(4), recorder.epochs[1])


def test_a_lossy_run_continues_from_its_own_last_weights(tmp_path, recorder):
    run_dir = os.fspath(tmp_path / "run")
    _fit(_model(1), [WeightWatch(run_dir, store_dtype="float16")])
    restored = _model(2)
    restored.set_weights(list(load_run(run_dir).weights("last").values()))  # float16 values
    assert _fit(restored, [WeightWatch(run_dir, store_dtype="float16"), recorder]) == []
    assert load_run(run_dir).steps == [-1, 0, 1, 2, 3]


# ------------------------------------------------------------------ fits that start anew


def test_a_new_model_at_epoch_0_starts_a_new_run_beside_with_one_warning(first, recorder):
    run_dir, _, before = first
    cb = WeightWatch(run_dir)
    said = _fit(_model(1), [cb, recorder])  # the same seed: the run's initial weights again
    assert len(said) == 1
    assert f"{run_dir} holds a run whose last snapshot (step 2)" in said[0]
    assert f"written to {run_dir}-2, beside it" in said[0]
    assert "fit(initial_epoch=3)" in said[0]
    assert cb.run_dir == run_dir + "-2"
    new = load_run(run_dir + "-2")
    assert new.steps == [-1, 0, 1]
    assert_same_arrays(new.weights("initial"), recorder.initial)
    assert_same_arrays(new.weights(1), recorder.epochs[1])
    assert _files(run_dir) == before  # the first run is untouched, byte for byte
    assert load_run(run_dir).steps == [-1, 0, 1, 2]
    # A third training goes to run-3; a later fit of the callback continues its run-2.
    assert len(_fit(_model(3), [WeightWatch(run_dir)])) == 1
    assert load_run(run_dir + "-3").steps == [-1, 0, 1]
    assert _fit(cb.model, [cb]) == [] and load_run(run_dir + "-2").steps == [-1, 0, 1, 2, 3]


def test_the_same_callback_with_a_new_model_starts_a_new_run(tmp_path):
    run_dir = os.fspath(tmp_path / "run")
    cb = WeightWatch(run_dir)
    _fit(_model(1), [cb])
    said = _fit(_model(2), [cb])
    assert len(said) == 1 and f"written to {run_dir}-2" in said[0]
    assert cb.run_dir == run_dir + "-2"
    assert load_run(run_dir).steps == load_run(run_dir + "-2").steps == [-1, 0, 1]


def test_if_exists_new_starts_beside_silently_and_error_refuses(tmp_path):
    new_cb = WeightWatch(tmp_path / "a", if_exists="new")
    _fit(_model(1), [new_cb])
    assert _fit(_model(2), [new_cb]) == []  # asked for: no warning
    assert new_cb.run_dir == os.fspath(tmp_path / "a") + "-2"
    error_cb = WeightWatch(tmp_path / "b", if_exists="error")
    _fit(_model(1), [error_cb])
    counter = keras.callbacks.LambdaCallback(on_train_batch_begin=lambda *a: pytest.fail("ran"))
    with pytest.raises(WeightWatchError, match=r"b: holds a run whose last snapshot is not the "
                                               r"model's weights, and fit starts at epoch 0"):
        _fit(_model(2), [error_cb, counter])
    assert load_run(tmp_path / "b").steps == [-1, 0, 1]
    assert not os.path.exists(os.fspath(tmp_path / "b") + "-2")


def test_a_fit_that_runs_no_epoch_leaves_the_run_as_it_was(first):
    run_dir, _, before = first
    assert _fit(_model(2), [WeightWatch(run_dir)], epochs=3, initial_epoch=3) == []
    assert _files(run_dir) == before
    assert not os.path.exists(run_dir + "-2")


def test_only_the_watched_weights_are_compared(tmp_path):
    # exclude= leaves `b` out of the run: a model that differs only there resumes it.
    run_dir = os.fspath(tmp_path / "run")
    model = _model(1)
    _fit(model, [WeightWatch(run_dir, exclude="^b/")])
    other = _model(2)
    other.set_weights(model.get_weights()[:2] + [np.ones((3, 1), "float32"), np.ones(1, "float32")])
    assert _fit(other, [WeightWatch(run_dir, exclude="^b/")]) == []
    assert load_run(run_dir).steps == [-1, 0, 1, 2, 3]


# ------------------------------------------------------------------ a change of architecture


def _conv_model(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(3, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(4, name="dense"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer="adam", loss="mse")
    return model


def _conv_fit(model, callbacks, **kwargs):
    rng = np.random.default_rng(0)
    x = rng.random((16, 6, 6, 1), dtype=np.float32)
    y = rng.random((16, 1), dtype=np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WeightWatchWarning)
        model.fit(x, y, batch_size=8, verbose=0, callbacks=callbacks, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, WeightWatchWarning)]


def _lora(model, rank=2):
    for name in ("dense", "conv"):
        model.get_layer(name).enable_lora(rank)
    model.compile(optimizer="adam", loss="mse")


ADAPTERS = ["conv/lora_kernel_a", "conv/lora_kernel_b", "dense/lora_kernel_a",
            "dense/lora_kernel_b"]


@pytest.mark.parametrize("views", [{}, {"feature_names": [f"f{i}" for i in range(48)],
                                        "feature_layer": "dense",
                                        "sample_images": "x"}], ids=["defaults", "views"])
def test_pretrain_then_lora_continues_one_run(tmp_path, recorder, views):
    run_dir = os.fspath(tmp_path / "run")
    if views:
        views = {**views, "sample_images": np.random.default_rng(1).random((2, 6, 6, 1),
                                                                           dtype=np.float32)}
    model = _conv_model(1)
    assert _conv_fit(model, [WeightWatch(run_dir, **views)], epochs=2) == []
    pretrained = load_run(run_dir)
    _lora(model)
    assert _conv_fit(model, [WeightWatch(run_dir, **views), recorder], epochs=4,
                     initial_epoch=2) == []
    assert not os.path.exists(run_dir + "-2")
    run = load_run(run_dir)
    assert run.steps == [-1, 0, 1, 2, 3] and run.verify().ok
    assert [s.key for s in run.specs] == [w.path.split("/", 1)[1] for w in model.weights]
    for snap in run.snapshots:  # the adapters join at the first continued snapshot
        assert set(ADAPTERS) <= set(snap.tensors) if snap.step >= 2 else not (
            set(ADAPTERS) & set(snap.tensors))
    assert run.snapshots[:3] == pretrained.snapshots  # the pretraining snapshots as they were
    assert_same_arrays(run.weights(3), recorder.epochs[3])
    for name in ("dense", "conv"):  # the kernel the layer computes with
        np.testing.assert_allclose(run.tensor(f"{name}/kernel", 3, effective=True),
                                   keras.ops.convert_to_numpy(model.get_layer(name).kernel),
                                   rtol=0, atol=1e-6)
    assert [d.key for d in run.derived] == ["conv/kernel", "dense/kernel"]
    for step in (-1, 1):  # before the adapters joined: the stored kernel is the one used
        for name in ("dense", "conv"):
            assert run.tensor(f"{name}/kernel", step, effective=True).tobytes() == (
                pretrained.tensor(f"{name}/kernel", step).tobytes())
    # Reading the whole run across the step where the adapters join.
    assert (f"joined    {', '.join(ADAPTERS)} at step 2 (earlier snapshots lack them)"
            in render_show(run))
    moved = {layer.name: layer for layer in drift(run).layers}
    for name in ("conv", "dense"):
        assert len(moved[name].step_change) == 4 and np.isfinite(moved[name].step_change).all()


def test_the_same_callback_continues_its_run_into_lora(tmp_path, recorder):
    run_dir = os.fspath(tmp_path / "run")
    model, cb = _conv_model(1), WeightWatch(run_dir)
    _conv_fit(model, [cb], epochs=2)
    _lora(model)
    assert _conv_fit(model, [cb, recorder], epochs=2) == []
    run = load_run(run_dir)
    assert cb.run_dir == run_dir and run.steps == [-1, 0, 1, 2, 3]
    assert_same_arrays(run.weights(3), recorder.epochs[1])
    assert set(ADAPTERS) <= set(run.snapshot(2).tensors)


def test_lora_on_other_weights_at_epoch_0_is_a_new_training_beside(tmp_path, recorder):
    run_dir = os.fspath(tmp_path / "run")
    _conv_fit(_conv_model(1), [WeightWatch(run_dir)], epochs=2)
    before = _files(run_dir)
    other = _conv_model(2)
    _lora(other)
    said = _conv_fit(other, [WeightWatch(run_dir), recorder], epochs=1)
    assert len(said) == 1 and f"written to {run_dir}-2, beside it" in said[0]
    assert _files(run_dir) == before
    assert_same_arrays(load_run(run_dir + "-2").weights(0), recorder.epochs[0])


def test_another_architecture_starts_beside_with_one_warning_naming_what_differs(first,
                                                                                  recorder):
    run_dir, model, before = first
    keras.utils.set_random_seed(5)
    wider = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, name="a"),
                              keras.layers.Dense(1, name="b")])
    wider.compile(optimizer="sgd", loss="mse")
    for initial_epoch in (0, 3):  # whatever the epoch: a model of another architecture
        cb = WeightWatch(run_dir)
        said = _fit(wider, [cb, recorder], epochs=initial_epoch + 2, initial_epoch=initial_epoch)
        assert said == [
            f"weightwatch: {run_dir} holds a run of another architecture (weight #0 is "
            "a/kernel float32[4, 3] in the run but a/kernel float32[4, 5] in the model), so "
            f"this fit is written to {cb.run_dir}, beside it."]
        assert_same_arrays(load_run(cb.run_dir).weights("last"),
                           recorder.epochs[initial_epoch + 1])
    assert _files(run_dir) == before and load_run(run_dir).steps == [-1, 0, 1, 2]
    # The callback of the first run, given the new model: beside too, never a failed fit.
    cb = WeightWatch(run_dir)
    _fit(model, [cb])
    said = _fit(wider, [cb])
    assert len(said) == 1 and "another architecture" in said[0]
    assert cb.run_dir == run_dir + "-4"
    error = WeightWatch(run_dir, if_exists="error")
    with pytest.raises(WeightWatchError, match=r"another architecture \(weight #0 is a/kernel"):
        _fit(wider, [error])


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("preempted")


@pytest.mark.parametrize("weightwatch_first", [True, False])
def test_a_job_resumed_by_backup_and_restore_is_one_run_in_either_order(tmp_path, recorder,
                                                                         weightwatch_first):
    # BackupAndRestore restores the weights and the epoch in its own on_train_begin: a
    # WeightWatch listed before it sees the un-restored weights there.
    run_dir, backup = os.fspath(tmp_path / "run"), os.fspath(tmp_path / "backup")

    def callbacks(*more):
        ww, br = WeightWatch(run_dir), keras.callbacks.BackupAndRestore(backup)
        return [ww, br, *more] if weightwatch_first else [br, ww, *more]

    first = callbacks(_Interrupt())
    with pytest.raises(RuntimeError, match="preempted"):
        _fit(_model(1), first, epochs=4)
    next(c for c in first if isinstance(c, WeightWatch)).on_train_end()  # as the process ends
    assert load_run(run_dir).steps == [-1, 0, 1]
    assert _fit(_model(2), callbacks(recorder), epochs=4) == []  # a new process's model
    assert not os.path.exists(run_dir + "-2")
    run = load_run(run_dir)
    assert run.steps == [-1, 0, 1, 2, 3] and sorted(recorder.epochs) == [2, 3]
    assert_same_arrays(run.weights(3), recorder.epochs[3])
