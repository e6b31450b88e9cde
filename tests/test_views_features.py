"""views.features: the top-k feature table and its scalars, read back with TensorBoard's reader."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from view_helpers import (
    BOSTON,
    PLANTED,
    _acc,
    _boston_model,
    _fit,
    _tags_by_plugin,
    _values,
)

from keras_weightwatch import WeightWatch, load_run
from keras_weightwatch.features import markdown_table, top_k_features
from keras_weightwatch.summaries import tag


def test_planted_dense_kernel_gives_exact_top_k_in_table_and_scalars(tmp_path):
    model = _boston_model()
    run = str(tmp_path / "run")
    x = np.random.default_rng(1).normal(size=(32, 13)).astype("float32")
    y = np.zeros((32, 1), "float32")
    _fit(model, WeightWatch(run, feature_names=BOSTON, top_k=5), x=x, y=y, lr=0.0)
    acc = _acc(run)
    tags = _tags_by_plugin(acc)
    assert tags["text"] == {"features/price", "health/findings"}
    assert {t for t in tags["scalars"] if t.startswith("features/")} == {
        f"features/price/{n}" for n in BOSTON
    }
    for step in (-1, 0, 1):
        for name, w in zip(BOSTON, PLANTED):
            assert float(_values(acc, f"features/price/{name}")[step]) == float(np.float32(w))
        table = _values(acc, "features/price")[step].item().decode().splitlines()
        assert table[2:] == [
            "| rank | feature | weight |",
            "|---:|:---|---:|",
            "| 1 | LSTAT | -3.81 |",
            "| 2 | DIS | -3.73 |",
            "| 3 | RM | 2.85 |",
            "| 4 | RAD | 2.29 |",
            "| 5 | NOX | -2.12 |",
        ]
    assert "initial weights, step -1" in _values(acc, "features/price")[-1].item().decode()


def test_feature_data_flags_correlated_features(tmp_path):
    model = _boston_model()
    rng = np.random.default_rng(3)
    data = rng.normal(size=(200, 13))
    data[:, 7] = -data[:, 12] * 2 + 0.01 * rng.normal(size=200)  # DIS ~ -LSTAT
    run = str(tmp_path / "run")
    cb = WeightWatch(run, feature_names=BOSTON, top_k=3, feature_data=data)
    _fit(model, cb, epochs=1, x=data.astype("float32"), y=np.zeros((200, 1), "float32"), lr=0.0)
    table = _values(_acc(run), "features/price")[0].item().decode()
    expected = markdown_table(
        top_k_features(np.array(PLANTED, "float32")[:, None], BOSTON, 3, data), 1
    )
    assert table.endswith(expected)
    assert "| 1 | LSTAT | -3.81 | " in table and "**DIS** (-1)" in table


def test_features_of_a_named_layer_with_several_units(tmp_path):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="a"), keras.layers.Dense(2, name="b")]
    )
    model.build((None, 3))
    model.get_layer("b").set_weights(
        [np.array([[3.0, 4.0], [0.0, 1.0]], "float32"), np.zeros(2, "float32")]
    )
    run = str(tmp_path / "run")
    cb = WeightWatch(run, feature_layer="b", feature_names=["h0", "h1"], top_k=2)
    _fit(model, cb, epochs=1, lr=0.0, x=np.ones((8, 3), "float32"))
    acc = _acc(run)
    assert float(_values(acc, "features/b/h0")[0]) == 5.0
    table = _values(acc, "features/b")[0].item().decode()
    assert "| 1 | h0 | 5 |" in table and "| h0 | 3 | 4 |" in table
    # the header records which kernel the table read, so `diff` compares the same one

    assert load_run(run).settings["feature_key"] == "b/kernel"


def test_a_wide_feature_layer_gets_scalars_only_for_its_top_k_features(tmp_path):
    from keras_weightwatch.views import MAX_FEATURE_SCALARS

    n = MAX_FEATURE_SCALARS + 20
    model = keras.Sequential([keras.Input((n,)), keras.layers.Dense(3, name="wide")])
    model.build((None, n))
    kernel = np.random.default_rng(0).normal(size=(n, 3)).astype("float32") * 0.01
    top = [7, 101, 3, 60]
    for rank, i in enumerate(top):
        kernel[i] = 5.0 - rank
    model.get_layer("wide").set_weights([kernel, np.zeros(3, "float32")])
    run = str(tmp_path / "run")
    names = [f"f{i}" for i in range(n)]
    _fit(model, WeightWatch(run, feature_names=names, top_k=4), lr=0.0, x=np.ones((8, n), "f4"))
    acc = _acc(run)
    tags = {t for t in _tags_by_plugin(acc)["scalars"] if t.startswith("features/")}
    assert tags == {f"features/wide/f{i}" for i in top}
    for i in top:
        norm = float(np.sqrt(np.sum(kernel[i].astype(np.float64) ** 2)))
        values = _values(acc, f"features/wide/f{i}")
        assert sorted(values) == [-1, 0, 1]
        assert all(float(v) == float(np.float32(norm)) for v in values.values())


def test_tags_do_not_collide_for_feature_names_that_clean_to_the_same_tag(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run, feature_names=["a b", "a_b"]), epochs=1)
    assert {t for t in _acc(run).Tags()["tensors"] if t.startswith("features/")} == {
        "features/d",
        tag("features", "d", "a b"),
        "features/d/a_b_1",
    }


# ------------------------------------------------------------------ a ranking true for the layer


def _table_rows(run_dir, step):
    from view_helpers import _acc, _values

    acc = _acc(run_dir)
    md = _values(acc, "features/hidden")[step].item().decode()
    rows = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    return md.splitlines()[0], [r.split("|")[2].strip() for r in rows]


@pytest.mark.parametrize("seed", [1, 2])
def test_quickstart_ranks_noise_last_in_both_seeds(tmp_path, seed):
    import random

    from keras_weightwatch import load_run

    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 4)).astype("float32")
    y = x @ np.array([2.0, -1.0, 0.5, 0.0], "float32")
    names = ["rooms", "distance", "age", "noise"]
    random.seed(seed)
    np.random.seed(seed)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=20, verbose=0, callbacks=[
        WeightWatch(tmp_path / "run", feature_names=names, feature_data=x, top_k=4)])
    run = load_run(tmp_path / "run")
    heading, ranked = _table_rows(run.path, run.epochs[-1])
    assert "effect on the output" in heading
    assert ranked[-1] == "noise"
    # The reference: the product of the kernels (the model is linear), times each std.
    w = run.weights(run.epochs[-1])
    effect = np.abs(w["hidden/kernel"].astype(np.float64) @ w["out/kernel"])[:, 0] * x.std(0)
    assert ranked == [names[i] for i in np.argsort(-effect)]
    # The snapshot stores the effects (the scalars' values), and diff ranks by them.
    from keras_weightwatch import diff_runs

    acc = _acc(run.path)
    last = run.epochs[-1]
    stored = run.snapshot(last).stats["hidden/kernel"]
    for i, n in enumerate(names):
        assert stored[f"effect/{i}"] == pytest.approx(
            float(_values(acc, f"features/hidden/{n}")[last]), rel=1e-6)
    f = diff_runs(run, run, step_a="initial").features
    assert f.ranked_by == "effect"
    assert [r.name for r in f.rows][:4] == ranked


def _planted(irrelevant_weight=5.0):
    """tanh hidden layer; input 2 feeds only units the output ignores (zero effect)."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh",
                                                                    name="hidden"),
                              keras.layers.Dense(1, name="out")])
    k1 = np.array([[1.0, 0.5, 0, 0], [0.3, -1.0, 0, 0], [0, 0, irrelevant_weight, 3.0]],
                  "float32")
    k2 = np.array([[1.0], [0.8], [0.0], [0.0]], "float32")
    model.set_weights([k1, np.zeros(4, "float32"), k2, np.zeros(1, "float32")])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    return model


@pytest.mark.parametrize("with_data", [True, False])
def test_a_planted_irrelevant_input_ranks_last_by_effect(tmp_path, with_data):
    x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    model = _planted()
    extra = {"feature_data": x} if with_data else {}
    model.fit(x, x[:, :1], epochs=1, verbose=0, callbacks=[WeightWatch(
        tmp_path / "run", feature_names=["a", "b", "irrelevant"], top_k=3, **extra)])
    heading, ranked = _table_rows(str(tmp_path / "run"), 0)
    if with_data:
        assert "effect on the output" in heading and ranked[-1] == "irrelevant"
    else:  # the row norm ranks it first, and the heading says what it ranks
        assert "not its effect" in heading and ranked[0] == "irrelevant"
