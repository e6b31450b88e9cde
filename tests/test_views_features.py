"""views.features: the top-k feature table and its scalars, read back with TensorBoard's reader."""

from __future__ import annotations

import keras
import numpy as np
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
    assert tags["text"] == {"features/price"}
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
