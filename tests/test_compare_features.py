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


def _two_unit_runs(tmp_path, effects_a, effects_b, settings):
    """Runs A and B of a (5, 2) feature kernel whose snapshots store the given effects."""
    from keras_weightwatch.features import effect_stats

    rng = np.random.default_rng(4)
    layers = [("hidden", "Dense")]
    out = []
    for name, effects in (("a", effects_a), ("b", effects_b)):
        w = {"hidden/kernel": rng.normal(size=(5, 2)).astype("float32")}
        stats = {} if effects is None else {"hidden/kernel": effect_stats(np.array(effects))}
        out.append(write_run(tmp_path / name, [("epoch", 0, w, stats)], layers, settings))
    return out


def test_stored_effects_rank_the_features_as_the_runs_tables_did(tmp_path):
    import json

    from compare_runs import cli

    from keras_weightwatch import load_run

    names = ["age", "sex", "bmi", "bp", "s1"]
    settings = {"feature_names": names, "top_k": 3, "feature_data": [64, 5],
                "feature_key": "hidden/kernel"}
    ea, eb = [0.9, 0.1, 0.5, 0.05, 0.7], [0.2, 0.8, 0.6, 0.05, 0.1]
    a, b = _two_unit_runs(tmp_path, ea, eb, settings)
    f = diff_runs(a, b).features
    assert f is not None and f.ranked_by == "effect" and f.note is None
    stored_a = load_run(a).snapshot(0).stats["hidden/kernel"]
    stored_b = load_run(b).snapshot(0).stats["hidden/kernel"]
    eff_a = np.array([stored_a[f"effect/{i}"] for i in range(5)])
    eff_b = np.array([stored_b[f"effect/{i}"] for i in range(5)])
    rank_a = {names[i]: r + 1 for r, i in enumerate(np.argsort(-eff_a, kind="stable"))}
    rank_b = {names[i]: r + 1 for r, i in enumerate(np.argsort(-eff_b, kind="stable"))}
    top_b = sorted((n for n in names if rank_b[n] <= 3), key=rank_b.get)
    left = sorted((n for n in names if rank_a[n] <= 3 and rank_b[n] > 3), key=rank_a.get)
    assert [r.name for r in f.rows] == top_b + left
    for r in f.rows:
        assert (r.rank_a, r.rank_b) == (rank_a[r.name], rank_b[r.name])
        assert r.weight_b == eff_b[names.index(r.name)]
    assert f.entered == tuple(n for n in top_b if rank_a[n] > 3) == ("sex",)
    assert f.left == tuple(left) == ("s1",)
    assert f.rank_changed == tuple(r.name for r in f.rows if rank_a[r.name] != rank_b[r.name])
    code, out, _ = cli("diff", a, b, "--json")
    doc = json.loads(out)["features"]
    assert doc["ranked_by"] == "effect" and doc["entered"] == ["sex"] and doc["left"] == ["s1"]
    assert doc["rank_changed"] == list(f.rank_changed)
    text = render_diff(diff_runs(a, b))
    assert "by the measured effect on the output" in text
    assert f"rank changed: {', '.join(f.rank_changed)}; entered the top 3: sex; left it: s1" in text
    # One side without stored effects: ranked by the row norms, and the diff says why.
    a2, b2 = _two_unit_runs(tmp_path / "half", ea, None, settings)
    f2 = diff_runs(a2, b2).features
    assert f2.ranked_by == "row_norm" and "feature_data" in f2.note
    kb = load_run(b2).weights(0)["hidden/kernel"].astype(np.float64)
    norms = np.sqrt((kb ** 2).sum(axis=1))
    assert [r.name for r in f2.rows[:3]] == [names[i] for i in np.argsort(-norms)[:3]]
    assert "row norm A" in render_diff(diff_runs(a2, b2))


def test_a_table_without_feature_names_compares_the_default_names(tmp_path):
    settings = {"feature_layer": "hidden", "top_k": 2, "feature_key": "hidden/kernel"}
    ka = np.array([[0.1], [-2.0], [1.0]], "float32")
    layers = [("hidden", "Dense")]
    a = write_run(tmp_path / "a", [("epoch", 0, {"hidden/kernel": ka})], layers, settings)
    b = write_run(tmp_path / "b", [("epoch", 0, {"hidden/kernel": ka[[0, 2, 1]]})], layers,
                  settings)
    f = diff_runs(a, b).features
    assert f is not None and f.ranked_by == "weight"
    # B swaps rows 1 and 2: |B| = (0.1, 1.0, 2.0).
    assert [(r.name, r.rank_a, r.rank_b) for r in f.rows] == [
        ("feature_2", 2, 1), ("feature_1", 1, 2)]
    assert f.rank_changed == ("feature_2", "feature_1") and f.entered == f.left == ()
    f = diff_runs(a, a).features
    assert f.rank_changed == () and "the same top 2 in the same order" in render_diff(
        diff_runs(a, a))
    # A run without any feature table has no comparison.
    plain = write_run(tmp_path / "p", [("epoch", 0, {"hidden/kernel": ka})], layers, {})
    assert diff_runs(plain, plain).features is None
