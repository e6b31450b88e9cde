"""The named input features of A and B side by side: ranks and signs from numpy."""

from __future__ import annotations

import numpy as np
import pytest
from compare_runs import write_run

from keras_weightwatch import diff_runs
from keras_weightwatch.report import render_diff


def test_named_features_side_by_side_with_rank_moves_and_sign_flips(tmp_path):
    names = ["age", "sex", "bmi", "bp", "s1"]
    ka = np.array([[0.5], [-3.0], [2.0], [0.1], [-1.0]], "float32")
    kb = np.array([[0.5], [2.5], [-4.0], [0.2], [-0.05]], "float32")
    settings = {"feature_names": names, "feature_layer": None, "top_k": 3}

    def weights(k):
        return {"hidden/kernel": k, "hidden/bias": np.zeros(1, "float32")}

    layers = [("hidden", "Dense")]
    a = write_run(tmp_path / "a", [("epoch", 0, weights(ka))], layers, settings)
    b = write_run(tmp_path / "b", [("epoch", 0, weights(kb))], layers, settings)
    f = diff_runs(a, b).features
    assert f is not None and f.key_a == f.key_b == "hidden/kernel" and f.k == 3
    rank_a = {names[i]: r + 1 for r, i in enumerate(np.argsort(-np.abs(ka[:, 0]), kind="stable"))}
    rank_b = {names[i]: r + 1 for r, i in enumerate(np.argsort(-np.abs(kb[:, 0]), kind="stable"))}
    top_b = sorted((n for n in names if rank_b[n] <= 3), key=rank_b.get)
    left = sorted((n for n in names if rank_a[n] <= 3 and rank_b[n] > 3), key=rank_a.get)
    assert [r.name for r in f.rows] == top_b + left
    for r in f.rows:
        i = names.index(r.name)
        assert (r.rank_a, r.rank_b) == (rank_a[r.name], rank_b[r.name])
        assert r.move == rank_a[r.name] - rank_b[r.name]
        assert (r.weight_a, r.weight_b) == (pytest.approx(ka[i, 0]), pytest.approx(kb[i, 0]))
        assert r.sign_flips == int(np.sign(ka[i, 0]) * np.sign(kb[i, 0]) < 0)
    text = render_diff(diff_runs(a, b))
    assert "top 3 input features of hidden/kernel" in text
    assert "flipped" in text
