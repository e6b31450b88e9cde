"""views.gradients: gradient norms on a probe batch, against finite differences and SGD."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from view_helpers import _acc, _tags_by_plugin, _values

from keras_weightwatch import WeightWatch, load_run
from keras_weightwatch.report import render_gradients, render_show


def _probe(n=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return x, y


def _tanh_mlp(lr=0.05, optimizer=None):
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh", name="hid"),
        keras.layers.Dense(1, name="out"),
    ])
    model.compile(optimizer=optimizer or keras.optimizers.SGD(lr), loss="mse")
    return model


def _numpy_loss(w, x, y):
    """The tanh MLP's mse in float64 numpy, from its weights [K1, b1, K2, b2]."""
    k1, b1, k2, b2 = (np.asarray(a, np.float64) for a in w)
    pred = np.tanh(x @ k1 + b1) @ k2 + b2
    return float(np.mean((pred - y) ** 2))


def _fd_norms(w, x, y, eps=1e-6):
    """Central finite differences of the numpy loss: the L2 norm of each tensor's gradient."""
    w = [np.asarray(a, np.float64).copy() for a in w]
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    norms = []
    for t in w:
        g = np.zeros_like(t)
        for idx in np.ndindex(t.shape):
            old = t[idx]
            t[idx] = old + eps
            up = _numpy_loss(w, x, y)
            t[idx] = old - eps
            down = _numpy_loss(w, x, y)
            t[idx] = old
            g[idx] = (up - down) / (2 * eps)
        norms.append(float(np.linalg.norm(g)))
    return norms


KEYS = ["hid/kernel", "hid/bias", "out/kernel", "out/bias"]


def last_stats(run):
    return run.snapshots[-1].stats


def test_stored_gradient_norms_match_finite_differences(tmp_path):
    x, y = _probe()
    model = _tanh_mlp()
    model.fit(x, y, epochs=2, batch_size=4, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run", gradient_data=(x, y))])
    run = load_run(tmp_path / "run")
    assert len(run.snapshots) == 3
    for snap in run.snapshots:
        w = [run.weights(snap.step)[k] for k in KEYS]
        fd = _fd_norms(w, x, y)
        for key, want, arr in zip(KEYS, fd, w):
            st = snap.stats[key]
            assert st["grad_norm"] == pytest.approx(want, rel=1e-4, abs=1e-7), (snap.name, key)
            w_norm = np.linalg.norm(arr.astype(np.float64))
            if w_norm == 0:  # the initial zero biases: no ratio rather than Inf
                assert "grad_to_weight" not in st
            else:
                assert st["grad_to_weight"] == pytest.approx(st["grad_norm"] / w_norm, rel=1e-6)


def test_initial_gradient_equals_the_optimizers_first_step(tmp_path):
    # SGD with learning rate 1 on the whole probe batch: W_0 - W_1 is the gradient at W_0.
    x, y = _probe(n=16, seed=3)
    model = _tanh_mlp(optimizer=keras.optimizers.SGD(1.0))
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run", gradient_data=(x, y))])
    run = load_run(tmp_path / "run")
    before, after = run.weights("initial"), run.weights(0)
    stats = run.snapshots[0].stats
    for key in KEYS:
        step = np.linalg.norm(before[key].astype(np.float64) - after[key])
        assert stats[key]["grad_norm"] == pytest.approx(step, rel=1e-4), key


def test_scalars_histograms_and_freq(tmp_path):
    x, y = _probe()
    model = _tanh_mlp()
    model.fit(x, y, epochs=3, batch_size=4, verbose=0, callbacks=[WeightWatch(
        tmp_path / "run", gradient_data=(x, y), gradient_freq=2, gradient_histograms=True)])
    run = load_run(tmp_path / "run")
    # Snapshots 0 (initial), 1, 2, 3: every 2nd, from the initial one, has gradients.
    has = [("grad_norm" in s.stats["hid/kernel"]) for s in run.snapshots]
    assert has == [True, False, True, False]
    acc = _acc(run.path)
    tags = _tags_by_plugin(acc)
    want = {f"{k}/{s}" for k in KEYS for s in ("grad_norm", "grad_to_weight")}
    assert {t for t in tags["scalars"] if "/grad_" in t} == want
    assert want <= tags["scalars"]
    assert {f"{k}/grad_histogram" for k in KEYS} <= tags["histograms"]
    steps = [s.step for s, h in zip(run.snapshots, has) if h]
    for key in KEYS:
        values = _values(acc, f"{key}/grad_norm")
        assert sorted(values) == steps
        for snap in run.snapshots:
            if snap.step in values:
                assert float(values[snap.step]) == pytest.approx(snap.stats[key]["grad_norm"],
                                                                 rel=1e-6)
        hist = _values(acc, f"{key}/grad_histogram")[steps[0]]
        assert hist[:, 2].sum() == run.weights("initial")[key].size


def test_show_prints_the_gradient_norms(tmp_path):
    x, y = _probe()
    model = _tanh_mlp()
    model.fit(x, y, epochs=2, batch_size=4, verbose=0,
              callbacks=[WeightWatch(tmp_path / "run", gradient_data=(x, y))])
    run = load_run(tmp_path / "run")
    lines = render_gradients(run)
    assert "3 snapshots" in lines[0]
    section = render_show(run).split("gradients of the loss", 1)[1].splitlines()
    for key in KEYS:
        row = next(line for line in section if line.startswith(key + " "))
        last = run.snapshots[-1].stats[key]
        cells = row.split()
        assert float(cells[-2]) == pytest.approx(last["grad_norm"], rel=1e-3)
        assert float(cells[-1]) == pytest.approx(last["grad_to_weight"], rel=1e-3)
    # drift and diff read the same stored numbers.
    from keras_weightwatch import diff_runs, drift

    d = drift(run)
    for g in (g for layer in d.layers for g in layer.gradients):
        assert g.grad_norm == tuple(s.stats[g.key]["grad_norm"] for s in run.snapshots)
    assert {g.key for layer in d.layers for g in layer.gradients} == set(KEYS)
    result = diff_runs(run, run, step_a="initial")
    for key in KEYS:
        t = result.tensor(key)
        assert t.gradients_a.grad_norm == run.snapshot("initial").stats[key]["grad_norm"]
        assert t.gradients_b.grad_to_weight == last_stats(run)[key]["grad_to_weight"]
    # A run without gradient_data has no such section.
    model.fit(x, y, epochs=1, verbose=0, callbacks=[WeightWatch(tmp_path / "plain")])
    assert render_gradients(load_run(tmp_path / "plain")) == []
    assert "gradients of the loss" not in render_show(load_run(tmp_path / "plain"))


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"gradient_histograms": True}, ValueError, "Received: gradient_data=None"),
        ({"gradient_freq": 2}, ValueError, "Received: gradient_data=None, saliency=None"),
        ({"gradient_data": np.ones((3, 2))}, TypeError, "pair"),
        ({"gradient_data": (np.ones((3, 2)), np.ones((2, 1)))}, ValueError,
         r"shapes \(3, 2\) and \(2, 1\)"),
        ({"gradient_data": (np.array(["a"]), np.ones(1))}, TypeError, "numeric"),
        ({"gradient_data": (np.ones((2, 3)), np.ones((2, 1))), "gradient_freq": 0}, ValueError,
         "Received: gradient_freq=0"),
    ],
)
def test_bad_gradient_options(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        WeightWatch(tmp_path / "run", **kwargs)


def _dead_bias(shape, dtype=None):
    n = int(shape[0])
    return np.r_[np.full(n - n // 4, -10.0), np.zeros(n // 4)].astype("float32")


def test_dead_units_are_the_relu_units_off_for_every_probe_sample(tmp_path):
    from keras_weightwatch.health import diagnose

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = x[:, :1] - x[:, 1:2]
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(32, activation="relu", bias_initializer=_dead_bias, name="dead"),
        keras.layers.Dense(1, name="out"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    recorded = {}

    class Before(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            h = np.maximum(x @ model.layers[0].kernel.numpy() + model.layers[0].bias.numpy(), 0)
            z = h @ model.layers[1].kernel.numpy() + model.layers[1].bias.numpy()
            recorded["dead"] = int(np.sum(np.all(z < 0, axis=0)))

    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[
        Before(), WeightWatch(tmp_path / "run", gradient_data=(x, y), histograms=False,
                              kernel_images=False, health=None)])
    initial = load_run(tmp_path / "run").snapshots[0].stats
    assert recorded["dead"] == 24
    assert initial["dead/kernel"]["grad_dead_units"] == recorded["dead"]
    assert initial["hidden/kernel"]["grad_dead_units"] == 0
    assert "grad_dead_units" not in initial["dead/bias"]
    assert "grad_dead_units" not in initial["out/kernel"]  # one unit: not a unit kernel
    found = diagnose(str(tmp_path / "run")).findings
    assert [(f.rule, f.layer, f.since) for f in found if f.rule == "dead_units"] == [
        ("dead_units", "dead", -1)]
