"""WeightWatch snapshots every weight, exactly as get_weights() returns it (TensorFlow backend)."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
from helpers import assert_same_arrays

from keras_weightwatch import WeightWatch, WeightWatchError, load_run


def _data(n=32, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = (x @ rng.normal(size=(d, 1))).astype("float32")
    return x, y


def sequential():
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(1),
        ]
    )


def functional_with_nested():
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="inner")
    inp = keras.Input((4,))
    h = keras.layers.Dense(3, activation="tanh")(inp)
    h = inner(h)
    out = keras.layers.Dense(1)(h)
    return keras.Model(inp, out)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.a = keras.layers.Dense(3, activation="relu")
        self.b = keras.layers.Dense(1)
        self.scale = self.add_weight(shape=(1,), initializer="ones", name="scale")

    def call(self, x):
        return self.b(self.a(x)) * self.scale


def subclassed():
    m = Subclassed()
    m(np.zeros((1, 4), "float32"))
    return m


@pytest.mark.parametrize("build", [sequential, functional_with_nested, subclassed])
def test_snapshots_equal_get_weights_bit_for_bit(tmp_path, recorder, build):
    keras.utils.set_random_seed(1)
    model = build()
    model.compile(optimizer="adam", loss="mse")
    x, y = _data()
    before = [np.array(w, copy=True) for w in model.get_weights()]
    model.fit(x, y, epochs=3, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run"), recorder])

    run = load_run(tmp_path / "run")
    assert run.epochs == [0, 1, 2]
    assert run.steps == [-1, 0, 1, 2]
    assert run.initial is not None and run.initial.step == -1
    assert_same_arrays(run.weights("initial"), before)
    assert_same_arrays(run.weights("initial"), recorder.initial)
    for epoch in (0, 1, 2):
        assert_same_arrays(run.weights(epoch), recorder.epochs[epoch])
    # Keys are weight paths without the model's own name, in model.weights order.
    expected_keys = [w.path.removeprefix(model.name + "/") for w in model.weights]
    assert list(run.weights(2)) == expected_keys
    assert run.verify().ok


def test_keys_trainable_flags_and_logs(tmp_path):
    keras.utils.set_random_seed(2)
    model = sequential()
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    x, y = _data()
    hist = model.fit(x, y, epochs=2, batch_size=8, verbose=0,
                     callbacks=[WeightWatch(tmp_path / "run")])
    run = load_run(tmp_path / "run")
    flags = {s.key: s.trainable for s in run.specs}
    assert flags["batch_normalization/moving_mean"] is False
    assert flags["batch_normalization/moving_variance"] is False
    assert flags["batch_normalization/gamma"] is True
    assert flags["dense/kernel"] is True
    for epoch in (0, 1):
        logs = run.logs(epoch)
        assert logs["loss"] == pytest.approx(hist.history["loss"][epoch], rel=1e-6)
        assert logs["mae"] == pytest.approx(hist.history["mae"][epoch], rel=1e-6)
    assert run.logs("initial") == {}
    # Per-layer parameter counts as model.summary() shows them.
    counts = {layer.name: layer.params for layer in run.layers}
    assert counts == {layer.name: layer.count_params() for layer in model.layers}
    assert run.model["total_params"] == model.count_params()


def test_freq_takes_every_nth_epoch_and_the_last(tmp_path, recorder):
    keras.utils.set_random_seed(3)
    model = sequential()
    model.compile(optimizer="sgd", loss="mse")
    x, y = _data()
    model.fit(x, y, epochs=6, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run", freq=4), recorder])
    run = load_run(tmp_path / "run")
    assert run.epochs == [0, 4, 5]
    assert_same_arrays(run.weights(4), recorder.epochs[4])
    assert_same_arrays(run.weights("last"), recorder.epochs[5])


def test_frozen_layer_is_stored_once(tmp_path):
    keras.utils.set_random_seed(4)
    base = keras.layers.Dense(8, name="base")
    model = keras.Sequential([keras.Input((4,)), base, keras.layers.Dense(1, name="head")])
    base.trainable = False
    model.compile(optimizer="adam", loss="mse")
    x, y = _data()
    model.fit(x, y, epochs=4, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run")])
    run = load_run(tmp_path / "run")
    assert len(run.snapshots) == 5
    for key in ("base/kernel", "base/bias"):
        files = {s.tensors[key].file for s in run.snapshots}
        assert len(files) == 1, key
    head_files = {s.tensors["head/kernel"].file for s in run.snapshots}
    assert len(head_files) == 5
    # Bytes on disk: the frozen layer once, the head once per snapshot.
    on_disk = {f for f in os.listdir(tmp_path / "run" / "tensors")}
    referenced = {os.path.basename(r.file) for s in run.snapshots for r in s.tensors.values()}
    assert on_disk == referenced
    frozen_bytes = sum(run.snapshots[0].tensors[k].bytes for k in ("base/kernel", "base/bias"))
    total = sum(os.path.getsize(tmp_path / "run" / "tensors" / f) for f in on_disk)
    per_snapshot_head = sum(run.snapshots[0].tensors[k].bytes for k in ("head/kernel", "head/bias"))
    # head/bias starts as zeros like base/bias, so content addressing may share that file too
    assert total <= frozen_bytes + 5 * per_snapshot_head


def test_second_fit_continues_the_run(tmp_path, recorder):
    keras.utils.set_random_seed(5)
    model = sequential()
    model.compile(optimizer="adam", loss="mse")
    x, y = _data()
    cb = WeightWatch(tmp_path / "run")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb])
    # Same instance, epochs restart at 0: the steps carry on after the run's last step.
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[cb, recorder])
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 1, 2, 3]
    assert_same_arrays(run.weights(3), recorder.epochs[1])
    assert [s.epoch for s in run.snapshots] == [None, 0, 1, 0, 1]


def test_initial_epoch_continues_in_a_new_callback(tmp_path, recorder):
    keras.utils.set_random_seed(6)
    model = sequential()
    model.compile(optimizer="adam", loss="mse")
    x, y = _data()
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    model.fit(x, y, epochs=5, initial_epoch=3, batch_size=8, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run"), recorder])
    run = load_run(tmp_path / "run")
    assert run.steps == [-1, 0, 1, 2, 3, 4]  # lines up with keras.callbacks.TensorBoard's epochs
    assert_same_arrays(run.weights(4), recorder.epochs[4])
    assert run.verify().ok


def test_other_architecture_is_refused_unless_new_run_asked(tmp_path):
    x, y = _data()
    m1 = sequential()
    m1.compile(optimizer="adam", loss="mse")
    m1.fit(x, y, epochs=1, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    m2 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), keras.layers.Dense(1)])
    m2.compile(optimizer="adam", loss="mse")
    with pytest.raises(WeightWatchError, match="another architecture"):
        m2.fit(x, y, epochs=1, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    cb = WeightWatch(tmp_path / "run", if_exists="new")
    m2.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert cb.run_dir == os.fspath(tmp_path / "run") + "-2"
    assert [s.shape for s in load_run(cb.run_dir).specs][0] == (4, 5)
    assert len(load_run(tmp_path / "run").specs) == 8  # the first run is untouched
    with pytest.raises(WeightWatchError, match="already holds a run"):
        m1.fit(x, y, epochs=1, verbose=0,
               callbacks=[WeightWatch(tmp_path / "run", if_exists="error")])


def test_same_architecture_other_layer_names_continues_with_the_runs_keys(tmp_path):
    x, y = _data()
    m1 = sequential()
    m1.compile(optimizer="adam", loss="mse")
    m1.fit(x, y, epochs=1, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    keys = [s.key for s in load_run(tmp_path / "run").specs]
    m2 = sequential()  # built in the same process: Keras numbers its layers dense_2, ...
    assert [w.path for w in m2.weights] != [w.path for w in m1.weights]
    m2.set_weights(m1.get_weights())
    m2.compile(optimizer="adam", loss="mse")
    m2.fit(x, y, epochs=2, initial_epoch=1, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    run = load_run(tmp_path / "run")
    assert list(run.weights(1)) == keys
    assert_same_arrays(run.weights(1), m2.get_weights())


def test_nothing_is_created_in_init(tmp_path):
    WeightWatch(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()


def test_run_directory_is_plain_json_and_npy(tmp_path):
    keras.utils.set_random_seed(7)
    model = sequential()
    model.compile(optimizer="adam", loss="mse")
    x, y = _data()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    # Read a snapshot with json and numpy alone, as docs/FORMAT.md describes.
    root = tmp_path / "run"
    header = json.loads((root / "weightwatch.json").read_text())
    assert header["format"] == "keras-weightwatch-run" and header["format_version"] == 1
    assert header["versions"]["backend"] == "tensorflow"
    snap = json.loads((root / "snapshots" / "epoch_000000.json").read_text())
    kernel = np.load(root / snap["tensors"]["dense/kernel"]["file"], allow_pickle=False)
    np.testing.assert_array_equal(kernel, model.layers[0].get_weights()[0])
    import hashlib

    tensor_file = root / snap["tensors"]["dense/kernel"]["file"]
    digest = hashlib.sha256(tensor_file.read_bytes()).hexdigest()
    assert digest == snap["tensors"]["dense/kernel"]["sha256"]
    assert set(snap["stats"]["dense/kernel"]) >= {"l2_norm", "mean", "std", "max_abs",
                                                   "nan_count", "inf_count", "update_ratio"}
    assert snap["stats"]["dense/kernel"]["l2_norm"] == pytest.approx(
        float(np.linalg.norm(kernel.astype(np.float64))), rel=1e-12)
