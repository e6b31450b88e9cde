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

from keras_weightwatch import WeightWatch, WeightWatchError, WeightWatchWarning, load_run


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
