"""Odd models, two writers on one directory, and bad arguments (issue 7).

Every snapshot is compared with `get_weights()` (recorded by an independent
callback) bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from helpers import assert_same_arrays

from keras_weightwatch import WeightWatch, WeightWatchError, load_run

ODD_NAME = 'count:1 *?<>|\\"é\t%~'  # not legal in file names on some systems; no "/"


class Counters(keras.layers.Layer):
    """Integer, boolean and zero-size variables, non-trainable, updated by `call`."""

    def build(self, input_shape):
        self.count = self.add_weight(shape=(), dtype="int32", trainable=False,
                                     initializer="zeros", name=ODD_NAME)
        self.flags = self.add_weight(shape=(3,), dtype="bool", trainable=False,
                                     initializer="zeros", name="flags")
        self.empty = self.add_weight(shape=(0, 3), initializer="zeros", name="empty",
                                     trainable=False)
        self.empty_cols = self.add_weight(shape=(4, 0), initializer="zeros", name="empty_cols",
                                          trainable=False)
        self.big_ints = self.add_weight(shape=(2,), dtype="int64", trainable=False,
                                        initializer="zeros", name="big")

    def call(self, x):
        self.count.assign_add(1)
        self.flags.assign(keras.ops.logical_not(self.flags))
        self.big_ints.assign_add(keras.ops.convert_to_tensor([2**40, -(2**40)], "int64"))
        return x


def _odd_model():
    inp = keras.Input((4,))
    h = keras.layers.Dropout(0.1)(inp)  # no weights
    h = Counters(name="counters")(h)
    shared = keras.layers.Dense(3, name="shared")  # one layer, two branches
    a = shared(h)
    b = shared(keras.layers.Activation("tanh")(h))
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Flatten()(h)  # no weights
    out = keras.layers.Dense(1, name="out")(h)
    return keras.Model(inp, out)


def _data(n=16, d=4):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype("float32")
    return x, x[:, :1] * 3.0


def test_odd_layers_and_dtypes_snapshot_and_load(tmp_path, recorder):
    keras.utils.set_random_seed(21)
    model = _odd_model()
    model.compile(optimizer="adam", loss="mse")
    x, y = _data()
    model.fit(x, y, epochs=3, batch_size=8, verbose=0,
              callbacks=[recorder, WeightWatch(tmp_path / "run")])
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 1, 2]
    assert run.verify().ok
    assert_same_arrays(run.weights("initial"), recorder.initial)
    for epoch in range(3):
        assert_same_arrays(run.weights(epoch), recorder.epochs[epoch])
    specs = {s.key: s for s in run.specs}
    assert specs[f"counters/{ODD_NAME}"].dtype == "int32"
    assert specs["counters/flags"].dtype == "bool"
    assert specs["counters/empty"].shape == (0, 3)
    assert not specs["counters/flags"].trainable
    # 2 batches per epoch: the counter moved, the flags flipped twice, int64 kept exactly.
    assert int(run.tensor(f"counters/{ODD_NAME}", 2)) == 6
    assert run.tensor("counters/big", 2).tolist() == [6 * 2**40, -6 * 2**40]
    # The shared layer's weights are stored once per snapshot, under one key.
    assert [k for k in specs if k.startswith("shared/")] == ["shared/kernel", "shared/bias"]
    # Tensor files are named by content only: the odd weight name never reaches the disk.
    names = os.listdir(tmp_path / "run" / "tensors")
    assert all(len(n) == 68 and n.endswith(".npy") for n in names)


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
    # A layer added: the same callback refuses before any epoch...
    bigger = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2),
                               keras.layers.Dense(1)])
    bigger.compile(optimizer="adam", loss="mse")
    with pytest.raises(WeightWatchError, match=r"another architecture \(the run has 4 weight "
                                               r"tensors, the model has 6\)"):
        bigger.fit(x, y, epochs=1, verbose=0, callbacks=[ww])
    assert load_run(tmp_path / "run").steps == [-1, 0, 1, 2, 3]  # untouched
    # ...and one with if_exists="new" starts a new run beside it.
    ww_new = WeightWatch(tmp_path / "run", if_exists="new")
    model.fit(x, y, epochs=1, verbose=0, callbacks=[ww_new])
    assert ww_new.run_dir == os.fspath(tmp_path / "run") + "-2"
    rec2 = type(recorder)()
    bigger.fit(x, y, epochs=1, verbose=0, callbacks=[ww_new, rec2])
    assert ww_new.run_dir == os.fspath(tmp_path / "run") + "-3"
    assert_same_arrays(load_run(ww_new.run_dir).weights(0), rec2.epochs[0])
    assert load_run(tmp_path / "run-2").steps == [-1, 0]


# ------------------------------------------------------------------ two writers


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
        second = WeightWatch(self.run)
        second.set_model(self.other)
        try:
            second.on_train_begin()
        except WeightWatchError as e:
            self.results["callback"] = str(e)
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
    assert probe.results["callback"] == out
    assert probe.results["new"] == run + "-2"
    # No interleaving: each run holds only its own model's weights.
    first = load_run(run)
    assert first.steps == [-1, 0, 1] and first.verify().ok
    assert_same_arrays(first.weights(1), recorder.epochs[1])
    second = load_run(run + "-2")
    assert [s.shape for s in second.specs] == [(4, 1), (1,)]
    assert_same_arrays(second.weights(0), other.get_weights())
    # Once the first writer is done, the lock is free again (the probe's empty model is
    # then refused for its architecture, not for the lock).
    again = subprocess.run([sys.executable, "-c", LOCK_PROBE, run], capture_output=True,
                           text=True, timeout=60)
    assert "another architecture" in again.stdout and "being written" not in again.stdout


# ------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize("kwargs, error, match", [
    ({"log_dir": 3}, TypeError, r"`log_dir` must be a path .*Received: log_dir=3"),
    ({"log_dir": ""}, ValueError, r"`log_dir` must not be empty\. Received: log_dir=''"),
    ({"freq": 0}, ValueError, r"`freq` must be an integer >= 1\. Received: freq=0"),
    ({"freq": 1.5}, TypeError, r"`freq` must be an integer >= 1\. Received: freq=1\.5"),
    ({"freq": True}, TypeError, r"Received: freq=True"),
    ({"histograms": "yes"}, TypeError, r"`histograms` must be True or False\. "
                                       r"Received: histograms='yes'"),
    ({"kernel_images": None}, TypeError, r"Received: kernel_images=None"),
    ({"max_kernel_tiles": -1}, ValueError, r"Received: max_kernel_tiles=-1"),
    ({"feature_names": "abc"}, TypeError, r"`feature_names` must be a list of strings\. "
                                          r"Received: feature_names='abc'"),
    ({"feature_names": ["a", 2]}, TypeError, r"must hold only strings; found 2\. "),
    ({"feature_names": ["a", "b", "a"]}, ValueError,
     r"`feature_names` must be unique; \['a'\] appear more than once\. "
     r"Received: feature_names=\['a', 'b', 'a'\]"),
    ({"top_k": 0}, ValueError, r"`top_k` must be an integer >= 1\. Received: top_k=0"),
    ({"feature_layer": 5}, TypeError, r"`feature_layer` must be a layer name\. "
                                      r"Received: feature_layer=5"),
    ({"feature_data": np.ones(3)}, ValueError,
     r"`feature_data` must be a 2-D array .*Received: feature_data with shape \(3,\)"),
    ({"response_mode": "kernels"}, ValueError,
     r"`response_mode` must be one of \['kernel', 'activation'\]\. "
     r"Received: response_mode='kernels'"),
    ({"response_layers": "conv"}, TypeError, r"Received: response_layers='conv'"),
    ({"responses_dir": 1}, TypeError, r"`responses_dir` must be a path\. "
                                      r"Received: responses_dir=1"),
    ({"if_exists": "overwrite"}, ValueError,
     r"`if_exists` must be one of \['continue', 'new', 'error'\]\. "
     r"Received: if_exists='overwrite'"),
    ({"strict": 1}, TypeError, r"`strict` must be True or False\. Received: strict=1"),
    ({"durable": "no"}, TypeError, r"Received: durable='no'"),
    ({"max_queue": 0}, ValueError, r"`max_queue` must be an integer >= 1\. "
                                   r"Received: max_queue=0"),
])
def test_bad_arguments_raise_in_init(tmp_path, kwargs, error, match):
    kwargs = dict(kwargs)
    log_dir = kwargs.pop("log_dir", tmp_path / "run")
    with pytest.raises(error, match=match):
        WeightWatch(log_dir, **kwargs)
    assert not (tmp_path / "run").exists()


def test_log_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match=r"must be a directory .*but it is a file\. "
                                         r"Received: log_dir="):
        WeightWatch(f)


def _cnn():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, name="conv"),
                             keras.layers.Flatten(), keras.layers.Dense(1, name="out")])


class _EpochCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs += 1


@pytest.mark.parametrize("kwargs, error, match", [
    ({"sample_images": np.ones((1, 1, 8, 8, 1))}, ValueError,
     r"must be a 4-D batch .*Received: sample_images with shape \(1, 1, 8, 8, 1\)"),
    ({"sample_images": np.ones((8, 8))}, ValueError,
     r"must be a 4-D batch .*Received: sample_images with shape \(8, 8\)"),
    ({"sample_images": np.ones((0, 8, 8, 1))}, ValueError,
     r"`sample_images` is empty\. Received: sample_images with shape \(0, 8, 8, 1\)"),
    ({"sample_images": np.ones((2, 8, 8, 2))}, ValueError,
     r"must match the model input shape \(None, 8, 8, 1\)\. "
     r"Received: sample_images with shape \(2, 8, 8, 2\)"),
    ({"sample_images": np.ones((2, 9, 8, 1))}, ValueError,
     r"must match the model input shape"),
    ({"sample_images": np.ones((1, 8, 8, 1), complex)}, TypeError,
     r"`sample_images` must be numeric images\. Received: sample_images with dtype complex128"),
    ({"sample_images": np.array([[[[None]] * 8] * 8])}, TypeError,
     r"must be numeric images\. Received: sample_images with dtype object"),
    ({"feature_layer": "conv", "feature_names": ["a"]}, ValueError,
     r"must name a Dense layer; 'conv' is a Conv2D\. Received: feature_layer='conv'"),
    ({"feature_layer": "missing", "feature_names": ["a"]}, ValueError,
     r"no layer named 'missing'.*Received: feature_layer='missing'"),
    ({"feature_layer": "out", "feature_names": ["a", "b"]}, ValueError,
     r"`feature_names` has 2 names but layer 'out' has 72 input features\. Received: "),
    ({"sample_images": np.ones((1, 8, 8, 1)), "response_layers": ["nope"]}, ValueError,
     r"no layer named 'nope'"),
    ({"sample_images": np.ones((1, 8, 8, 1)), "response_layers": ["out"]}, ValueError,
     r"must name Conv2D layers.*'out' is a Dense\. Received: response_layers=\['out'\]"),
])
def test_model_dependent_bad_arguments_raise_before_any_epoch(tmp_path, kwargs, error, match):
    model = _cnn()
    model.compile(optimizer="sgd", loss="mse")
    counter = _EpochCounter()
    with pytest.raises(error, match=match):
        model.fit(np.zeros((2, 8, 8, 1)), np.zeros((2, 1)), epochs=1, verbose=0,
                  callbacks=[counter, WeightWatch(tmp_path / "run", **kwargs)])
    assert counter.epochs == 0
    assert not (tmp_path / "run").exists()


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
