"""views.stats and views.histograms: the scalars and histograms of every weight, NaN and Inf
included."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from view_helpers import (
    _acc,
    _fit,
    _values,
)

from keras_weightwatch import WeightWatch, WeightWatchWarning, load_run


def test_nan_and_inf_are_counted_and_histograms_stay_non_empty(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    model.build((None, 4))
    k, b = model.get_weights()
    k[0, 0] = np.nan
    k[1, 1] = np.nan
    k[2, 2] = np.inf
    k[3, 0] = -np.inf
    model.set_weights([k, b])
    run = str(tmp_path / "run")
    with pytest.warns(WeightWatchWarning, match="non_finite in layer 'd' at step -1"):
        _fit(model, WeightWatch(run, feature_names=list("abcd")))
    acc = _acc(run)
    nan = _values(acc, "d/kernel/nan_count")
    inf = _values(acc, "d/kernel/inf_count")
    assert float(nan[-1]) == 2 and float(inf[-1]) == 2
    for step in (-1, 0, 1):
        h = _values(acc, "d/kernel/histogram")[step]
        assert h.shape == (30, 3) and np.all(np.isfinite(h))
        assert h[:, 2].sum() + float(nan[step]) + float(inf[step]) == 12
    assert _values(acc, "d/kernel/histogram")[-1][:, 2].sum() == 8
    # rows with Inf rank first, NaN last; the table shows them as such
    table = _values(acc, "features/d")[-1].item().decode()
    for line in (
        "| 1 | c | Inf |",
        "| 2 | d | Inf |",
        "| 3 | a | NaN |",
        "| 4 | b | NaN |",
        "| a | NaN | ",
    ):
        assert line in table


class _PoisonAtLastEpoch(keras.callbacks.Callback):
    """Puts a NaN and an Inf into `d/kernel` at the end of the last epoch (before WeightWatch
    takes that snapshot: it runs first in the callback list)."""

    def __init__(self, last):
        super().__init__()
        self.last = last

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.last:
            layer = self.model.get_layer("d")
            k, b = layer.get_weights()
            k[0, 0], k[1, 0] = np.nan, np.inf
            layer.set_weights([k, b])


def test_nan_and_inf_counts_are_written_once_a_weight_has_one(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d"),
                              keras.layers.Dense(1, name="o")])
    run = str(tmp_path / "run")
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    with pytest.warns(WeightWatchWarning, match="non_finite in layer 'd' at step 2"):
        model.fit(rng.random((16, 4)), rng.random((16, 1)), epochs=3, batch_size=8, verbose=0,
                  callbacks=[_PoisonAtLastEpoch(2), WeightWatch(run, histograms=False)])
    acc = _acc(run)
    counts = {t for t in acc.Tags()["tensors"] if t.endswith(("nan_count", "inf_count"))}
    assert counts == {"d/kernel/nan_count", "d/kernel/inf_count"}
    assert {s: float(v) for s, v in _values(acc, "d/kernel/nan_count").items()} == {2: 1.0}
    assert {s: float(v) for s, v in _values(acc, "d/kernel/inf_count").items()} == {2: 1.0}
    assert sorted(_values(acc, "d/kernel/l2_norm")) == [-1, 0, 1, 2]
    # the run's stored statistics keep every count, zeros included
    stored = load_run(run)
    for step in stored.steps:
        st = stored.snapshot(step).stats
        assert st["o/kernel"]["nan_count"] == 0 and st["o/kernel"]["inf_count"] == 0
        assert st["d/kernel"]["nan_count"] == (1 if step == 2 else 0)


class _Events:
    def __init__(self):
        self.tags: dict[int, set[str]] = {}

    def write(self, step, values, wall_time=None):
        self.tags[step] = {v.tag for v in values}


def test_counts_stay_on_once_a_weight_had_a_nan_and_reset_for_a_new_fit():
    from keras_weightwatch.views.stats import StatsView

    clean = {"l2_norm": 1.0, "nan_count": 0, "inf_count": 0}
    view, events = StatsView(), _Events()
    view.prepare(None, None)
    for step, a_nan in ((0, 0), (1, 2), (2, 0)):
        snap = type("S", (), {"step": step, "time": 0.0})()
        view.write(snap, {"a": dict(clean, nan_count=a_nan), "b": clean}, None, events)
    assert events.tags[0] == {"a/l2_norm", "b/l2_norm"}
    counts = {"a/l2_norm", "b/l2_norm", "a/nan_count", "a/inf_count"}
    assert events.tags[1] == events.tags[2] == counts  # back to 0 at step 2, still charted
    view.prepare(None, None)
    view.write(type("S", (), {"step": 3, "time": 0.0})(), {"a": clean}, None, events)
    assert events.tags[3] == {"a/l2_norm"}
