"""capture: the copy of the weights into reused host buffers, bit for bit for every dtype."""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import pytest
from helpers import assert_same_arrays

import keras_weightwatch.capture as capture_module
from keras_weightwatch import WeightWatch, load_run
from keras_weightwatch.capture import BufferPool, capture_into


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


def test_capture_into_reuses_the_released_set_and_equals_numpy():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(1)])
    variables = list(model.weights)
    pool = BufferPool(1)
    first = capture_into(variables, pool)
    assert_same_arrays(dict(enumerate(first)), model.get_weights())
    pool.release(first)
    model.layers[0].kernel.assign(np.full((3, 2), 4.0, "float32"))
    second = capture_into(variables, pool)
    assert all(a is b for a, b in zip(first, second))  # the same buffers, written again
    assert_same_arrays(dict(enumerate(second)), model.get_weights())
    assert pool.created == 1 and pool.in_use == 1


def _layout_arrays(seed: int, shapes=((300, 200), (200,), (7,))) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype("float32") for shape in shapes]


def test_a_cleared_pools_sets_serve_the_next_pool_of_the_same_shapes(monkeypatch):
    """Sets handed on at `clear(keep=True)` are what the next pool copies into (no fresh
    memory), each array once, newest first; the copies equal their sources; other shapes,
    and a plain `clear()`, get fresh memory."""
    spares = capture_module._Spares(1 << 20)
    monkeypatch.setattr(capture_module, "SPARES", spares)
    first = BufferPool(2)
    sets = []
    for i in range(2):
        assert first.reserve()  # counted as `acquire` and `fill` count them
        sets.append(first.allocate(_layout_arrays(i)))
    for buffers in sets:
        first.release(buffers)
    first.clear(keep=True)
    assert first.created == 0 and spares.nbytes == 2 * sum(a.nbytes for a in sets[0])

    second = BufferPool(2)
    sources = _layout_arrays(7)
    got = second.allocate(sources)
    assert all(g is old for g, old in zip(got, sets[1]))  # the set released last
    assert_same_arrays(dict(enumerate(got)), sources)
    again = second.allocate(_layout_arrays(8))
    assert all(g is old for g, old in zip(again, sets[0]))
    assert spares.nbytes == 0
    fresh = second.allocate(_layout_arrays(9))
    assert not any(np.shares_memory(f, old) for f in fresh for s in sets for old in s)

    third = BufferPool(1)
    third.release(third.allocate(_layout_arrays(1, shapes=((5, 5),))))
    third.clear()
    assert spares.nbytes == 0  # a plain clear hands nothing on
    other = BufferPool(1).allocate(_layout_arrays(2, shapes=((200, 300),)))
    assert spares.nbytes == 0 and other[0].shape == (200, 300)


def test_kept_sets_stay_within_their_bytes_letting_the_oldest_go():
    spares = capture_module._Spares(3 * 240_000)
    a, b = _layout_arrays(0, shapes=((300, 200),)), _layout_arrays(1, shapes=((300, 200),))
    c = _layout_arrays(2, shapes=((300, 200), (300, 200)))
    assert spares.keep(a) and spares.keep(b) and spares.nbytes == 2 * 240_000
    assert spares.keep(c) and spares.nbytes == 3 * 240_000  # a, the oldest, let go
    taken = [spares.take((300, 200), np.dtype("float32")) for _ in range(4)]
    assert [t is x for t, x in zip(taken, [c[1], c[0], b[0]])] == [True] * 3
    assert taken[3] is None and spares.nbytes == 0
    assert not spares.keep(_layout_arrays(3, shapes=((1000, 1000),)))  # larger than the room
    assert spares.nbytes == 0


def test_a_second_fit_copies_into_the_first_fits_sets(tmp_path, monkeypatch, recorder):
    """The sets a fit leaves are what the next fit of the model captures into: it maps in
    no fresh memory for them, and its snapshots still equal `get_weights()`."""
    monkeypatch.setattr(capture_module, "SPARES", capture_module._Spares(1 << 20))
    fresh: list[tuple[int, ...]] = []
    real_empty = capture_module.empty

    def counting_empty(shape, dtype):
        fresh.append(tuple(shape))
        return real_empty(shape, dtype)

    monkeypatch.setattr(capture_module, "empty", counting_empty)
    keras.utils.set_random_seed(3)
    model = _odd_model()
    model.compile(optimizer="adam", loss="mse")
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[WeightWatch(tmp_path / "a")])
    assert fresh and capture_module.SPARES.nbytes > 0  # the first fit's sets were kept
    fresh.clear()
    model.fit(x, y, epochs=2, batch_size=8, verbose=0,
              callbacks=[recorder, WeightWatch(tmp_path / "b")])
    assert fresh == []
    run = load_run(tmp_path / "b")
    assert run.verify().ok
    for epoch in range(2):
        assert_same_arrays(run.weights(epoch), recorder.epochs[epoch])


def test_the_header_records_the_optimizer_and_the_layers_configuration(tmp_path):
    # Reference: Keras's own get_config() of the optimizer and of each layer.
    import json

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((6, 6, 1)),
                              keras.layers.Conv2D(2, (3, 3), activation="relu", name="conv"),
                              keras.layers.Flatten(name="flat"),
                              keras.layers.Dropout(0.25, name="drop"),
                              keras.layers.Dense(1, name="out")])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, decay_steps=10, decay_rate=0.5)
    model.compile(optimizer=keras.optimizers.Adam(schedule, clipnorm=1.5), loss="mse")
    x = np.random.default_rng(0).random((8, 6, 6, 1), dtype=np.float32)
    model.fit(x, x[:, 0, 0], epochs=1, verbose=0, callbacks=[WeightWatch(tmp_path / "run")])
    header = load_run(tmp_path / "run").model
    expected = json.loads(json.dumps(model.optimizer.get_config()))
    assert header["optimizer"] == {"class_name": "Adam", **expected}
    assert header["optimizer"]["learning_rate"]["class_name"] == "ExponentialDecay"
    layers = {c["name"]: c for c in header["config"]["layers"]}
    assert list(layers) == [layer.name for layer in model.layers]
    conv = model.get_layer("conv").get_config()
    assert {k: layers["conv"][k] for k in ("filters", "kernel_size", "activation", "padding")} == {
        "filters": conv["filters"], "kernel_size": list(conv["kernel_size"]),
        "activation": conv["activation"], "padding": conv["padding"]}
    assert layers["conv"]["kernel_initializer"] == conv["kernel_initializer"]["class_name"]
    assert layers["drop"]["rate"] == model.get_layer("drop").get_config()["rate"] == 0.25
    assert len(header["config"]["digest"]) == 64
    assert capture_module.describe_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(
        1)])).extra.keys() == {"config"}  # no optimizer: none recorded


@pytest.mark.parametrize("make", [
    lambda: keras.layers.Dense(5, activation="relu", use_bias=False, name="d"),
    lambda: keras.layers.Conv2D(4, (3, 2), strides=2, padding="same", name="c"),
    lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    lambda: keras.optimizers.Adam(0.003, beta_1=0.8, clipnorm=1.0),
])
def test_without_tensorflow_imported_the_options_are_those_of_get_config(make):
    """On JAX or PyTorch (TensorFlow not imported, which Keras's `get_config()` would do) the
    header's options are the object's public attributes: the same values `get_config()` gives."""
    obj = make()
    reference = obj.get_config()  # TensorFlow is imported in this test process
    options = capture_module._public_options(obj)
    shared = set(options) & set(reference)
    expected = {"units", "activation", "use_bias"} if isinstance(obj, keras.layers.Dense) else (
        {"filters", "kernel_size", "strides", "padding"} if isinstance(obj, keras.layers.Conv2D)
        else {"momentum", "nesterov"} if isinstance(obj, keras.optimizers.SGD)
        else {"beta_1", "clipnorm"})
    assert expected <= shared
    for key in shared:
        got, want = options[key], reference[key]
        assert (list(got) if isinstance(got, tuple) else got) == (
            list(want) if isinstance(want, tuple) else want), key
