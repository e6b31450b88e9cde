"""views.build: which views the settings turn on, and the exact tags they write for a tiny CNN."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from view_helpers import (
    STATS,
    _acc,
    _cnn,
    _fit,
    _images,
    _kernel_tags,
    _response_tag,
    _tags_by_plugin,
    _values,
)

from keras_weightwatch import WeightWatch, load_run


def test_exact_tags_per_kind_for_a_tiny_cnn(tmp_path, recorder):
    keras.utils.set_random_seed(0)
    model = _cnn()
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run, sample_images=_images()), extra=[recorder])
    acc = _acc(run)
    weights = ["conv/kernel", "conv/bias", "out/kernel", "out/bias"]
    kernel_image = _kernel_tags(model, ["conv/kernel"])["conv/kernel"]
    assert _tags_by_plugin(acc) == {
        "scalars": {f"{w}/{s}" for w in weights for s in STATS}
        | {"health/errors", "health/warnings"},
        "histograms": {f"{w}/histogram" for w in weights},
        "images": {kernel_image, _response_tag(model, "conv", 0), _response_tag(model, "conv", 1)},
        "text": {"health/findings"},
    }
    # steps: the initial snapshot is -1; update_ratio starts at the first epoch
    assert sorted(_values(acc, "conv/kernel/l2_norm")) == [-1, 0, 1]
    assert sorted(_values(acc, "conv/kernel/update_ratio")) == [0, 1]
    assert sorted(_values(acc, kernel_image)) == [-1, 0, 1]
    assert sorted(_values(acc, "out/bias/histogram")) == [-1, 0, 1]
    # statistics equal a numpy computation on get_weights()
    snaps = {-1: recorder.initial, 0: recorder.epochs[0], 1: recorder.epochs[1]}
    for i, w in enumerate(weights):
        for step, arrays in snaps.items():
            a = arrays[i].astype(np.float64)
            got = {s: float(_values(acc, f"{w}/{s}").get(step, np.nan)) for s in STATS}
            assert got["l2_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-6)
            assert got["mean"] == pytest.approx(a.mean(), rel=1e-5, abs=1e-7)
            assert got["std"] == pytest.approx(a.std(), rel=1e-4, abs=1e-6)
            assert got["max_abs"] == pytest.approx(np.abs(a).max(), rel=1e-6)
            stored = load_run(run).snapshot(step).stats[w]
            assert stored["nan_count"] == 0 and stored["inf_count"] == 0  # kept in the run
            if step >= 0:
                prev = snaps[step - 1][i].astype(np.float64)
                ratio = np.linalg.norm(a - prev) / np.linalg.norm(prev) if prev.any() else np.nan
                if np.isfinite(ratio):
                    assert got["update_ratio"] == pytest.approx(ratio, rel=1e-5)
            h = _values(acc, f"{w}/histogram")[step]
            assert h.shape == (30, 3) and h[:, 2].sum() == a.size
            assert h[0, 0] == pytest.approx(a.min()) or a.min() == a.max()
    # the statistics are in the snapshot manifest too
    rec = load_run(run).snapshot(1)
    assert rec.stats["conv/kernel"]["l2_norm"] == pytest.approx(
        float(_values(acc, "conv/kernel/l2_norm")[1]), rel=1e-6
    )


def test_switches_turn_views_off(tmp_path):
    model = _cnn()
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run, histograms=False, kernel_images=False, health=None), epochs=1)
    assert set(_tags_by_plugin(_acc(run))) == {"scalars"}
