"""`compare.plan`: the pure-data plan of a diff, checked against the runs it was made from."""

from __future__ import annotations

import numpy as np
import pytest
from compare_runs import LAYERS, epochs, weights, write_run

from keras_weightwatch import WeightWatchError, load_run
from keras_weightwatch.compare import STATUS_ONLY_A, STATUS_ONLY_B, STATUS_SHAPE
from keras_weightwatch.compare.plan import COMPARE, INPUT, make_plan, units_axis, weighted_feeds
from keras_weightwatch.naming import CONV_KINDS


def _plan(a: str, b: str, pattern=None):
    run_a, run_b = load_run(a), load_run(b)
    return make_plan(run_a, run_a.snapshot("last"), run_b, run_b.snapshot("last"), pattern)


def test_tensors_are_grouped_by_layer_in_weight_order_with_their_status(tmp_path):
    w = weights(np.random.default_rng(0))
    v = {k: x for k, x in w.items() if not k.startswith("out/")}
    v["dense/kernel"] = np.ones((24, 7), "float32")
    v["extra/kernel"] = np.ones((7, 2), "float32")
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)], layers=LAYERS[:4] + [("extra", "Dense")])
    plan = _plan(a, b)
    assert plan.a == f"{a}@0" and plan.b == f"{b}@0"
    keys = list(w) + [k for k in v if k not in w]
    assert [t.key for layer in plan.layers for t in layer.tensors] == keys
    layer_names = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in keys))
    assert [layer.name for layer in plan.layers] == layer_names
    for layer in plan.layers:
        for t in layer.tensors:
            expect = (STATUS_ONLY_A if t.key not in v else STATUS_ONLY_B if t.key not in w
                      else STATUS_SHAPE if w[t.key].shape != v[t.key].shape else COMPARE)
            assert t.status == expect, t.key
            assert t.shape_a == (w[t.key].shape if t.key in w else None)
            assert t.shape_b == (v[t.key].shape if t.key in v else None)


def test_the_kernel_is_matched_first_and_the_axis_is_the_units(tmp_path):
    w = weights(np.random.default_rng(1))
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    plan = _plan(a, a)
    by_name = {layer.name: layer for layer in plan.layers}
    for name in ("conv1", "conv2", "dense", "out"):
        layer = by_name[name]
        assert layer.kernel is not None and layer.kernel.key == f"{name}/kernel"
        assert layer.kernel.units_axis == -1
        assert [t.key for t in layer.order()] == [f"{name}/kernel", f"{name}/bias"]
    assert by_name["bn"].kernel is None
    assert all(t.units_axis is None for t in by_name["bn"].tensors)


def test_the_pattern_keeps_matching_keys_and_errors_name_both_snapshots(tmp_path):
    import re

    a = write_run(tmp_path / "a", epochs())
    plan = _plan(a, a, re.compile("^conv2/"))
    assert [t.key for layer in plan.layers for t in layer.tensors] == ["conv2/kernel",
                                                                       "conv2/bias"]
    with pytest.raises(WeightWatchError, match="matches 'nothing'"):
        _plan(a, a, re.compile("nothing"))
    other = write_run(tmp_path / "o", [("epoch", 0, {"x/kernel": np.ones((2, 2), "f4")})],
                      layers=[("x", "Dense")])
    with pytest.raises(WeightWatchError, match="no weight tensor in common"):
        _plan(a, other)


@pytest.mark.parametrize("class_name", ["Dense", *sorted(CONV_KINDS)])
def test_units_axis_is_the_axis_keras_gives_the_layers_filters(class_name):
    # Independent reference: build the Keras layer with 7 units (filters) and find the axis
    # of length 7 in the weight the matching reads.
    import re

    import keras

    cls = getattr(keras.layers, class_name, None)
    if cls is None:
        pytest.skip(f"this Keras has no {class_name}")
    if class_name == "Dense":
        layer, input_shape, kernel = cls(7), (5,), "kernel"
    else:
        rank = int(re.search(r"(\d)D", class_name).group(1))
        layer = cls(2) if "Depthwise" in class_name else cls(7, 2)
        input_shape, kernel = (6,) * rank + (3,), CONV_KINDS[class_name].matched_kernel
    layer.build((None, *input_shape))
    weight = next(v for v in layer.weights if v.path.rsplit("/", 1)[-1] == kernel)
    shape = tuple(weight.shape)
    got = units_axis(class_name, f"layer/{kernel}", shape)
    if "Depthwise" in class_name:  # one filter per input channel: nothing to match
        assert got is None
        return
    assert [i - len(shape) for i, n in enumerate(shape) if n == 7] == [got]
    assert units_axis(class_name, "layer/bias", (7,)) is None


def test_feeds_follow_the_recorded_graph_through_layers_without_weights(tmp_path):
    import keras

    inp = keras.Input((6, 6, 1), name="x")
    side = keras.layers.Conv2D(3, 3, padding="same", name="side")(inp)
    c1 = keras.layers.Conv2D(3, 3, padding="same", name="c1")(inp)
    joined = keras.layers.Add(name="add")([side, c1])
    pooled = keras.layers.Flatten(name="flat")(keras.layers.MaxPooling2D(name="pool")(joined))
    out = keras.layers.Dense(2, name="out")(pooled)
    model = keras.Model(inp, out)
    model.compile(optimizer="sgd", loss="mse")
    from keras_weightwatch import WeightWatch

    x = np.zeros((4, 6, 6, 1), "float32")
    model.fit(x, np.zeros((4, 2), "float32"), epochs=1, verbose=0,
              callbacks=[WeightWatch(tmp_path / "r", histograms=False)])
    run = load_run(tmp_path / "r")
    feeds = weighted_feeds(run)
    assert feeds == {"side": (INPUT,), "c1": (INPUT,), "out": ("side", "c1")}
    plan = make_plan(run, run.snapshot("last"), run, run.snapshot("last"))
    assert {layer.name: layer.feeds for layer in plan.layers} == feeds


def test_runs_without_a_graph_have_no_feeds(tmp_path):
    a = write_run(tmp_path / "a", epochs())
    assert weighted_feeds(load_run(a)) is None
    assert all(layer.feeds is None for layer in _plan(a, a).layers)
