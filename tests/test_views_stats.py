"""views.stats and views.histograms: the scalars and histograms of every weight, NaN and Inf
included."""

from __future__ import annotations

import keras
import numpy as np
from view_helpers import (
    _acc,
    _fit,
    _values,
)

from keras_weightwatch import WeightWatch


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
