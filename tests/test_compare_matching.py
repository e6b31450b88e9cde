"""Matching units and carrying the matching along the graph: permuted copies, brute force."""

from __future__ import annotations

import numpy as np
import pytest
from compare_runs import oracle, perm_of, permuted, weights, write_run

from keras_weightwatch import diff_runs
from keras_weightwatch.run import load_run


def test_permuted_units_differ_raw_but_match_after_matching(tmp_path):
    w = weights(np.random.default_rng(3))
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, permuted(w))])
    result = diff_runs(a, b)
    moved_layers = ["conv1/kernel", "conv1/bias", "bn/gamma", "bn/beta", "bn/moving_mean",
                    "conv2/kernel", "conv2/bias", "dense/kernel", "dense/bias", "out/kernel"]
    for key in moved_layers:
        t = result.tensor(key)
        raw = oracle(w[key], permuted(w)[key])
        assert t.cosine == pytest.approx(raw["cosine"], rel=1e-9, abs=1e-12), key
        assert t.cosine < 1 - 1e-6, key
        assert t.matched_cosine == pytest.approx(1.0, abs=1e-9), key
        assert t.matched_rel_l2 == pytest.approx(0.0, abs=1e-7), key
    for key in ("conv1/kernel", "conv2/kernel", "dense/kernel"):
        a_k, b_k = w[key], permuted(w)[key]
        moved = sum(not np.array_equal(a_k[..., i], b_k[..., i]) for i in range(a_k.shape[-1]))
        # conv2 and dense are also permuted along their inputs: every unit moved.
        assert result.tensor(key).units_moved == (
            moved if key == "conv1/kernel" else int(np.sum(perm_of(a_k, b_k) != np.arange(
                a_k.shape[-1])))), key
    layer = {lay.name: lay for lay in result.layers}["conv2"]
    assert layer.cosine < 1 - 1e-6 and layer.matched_cosine == pytest.approx(1.0, abs=1e-9)
    assert result.tensor("out/bias").identical


def test_chunked_reduction_matches_numpy_on_a_tensor_larger_than_a_chunk(tmp_path, monkeypatch):
    from keras_weightwatch import reductions

    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", 1000)
    rng = np.random.default_rng(5)
    a_arr = rng.normal(size=(300, 70)).astype("float32")
    b_arr = (a_arr + rng.normal(size=a_arr.shape) * 0.3).astype("float32")
    a = write_run(tmp_path / "a", [("epoch", 0, {"d/kernel": a_arr})], layers=[("d", "Dense")])
    b = write_run(tmp_path / "b", [("epoch", 0, {"d/kernel": b_arr[:, ::-1]})],
                  layers=[("d", "Dense")])
    t = diff_runs(a, b).tensor("d/kernel")
    for name, value in oracle(a_arr, b_arr[:, ::-1]).items():
        assert getattr(t, name) == pytest.approx(value, rel=1e-10), name
    assert t.matched_cosine == pytest.approx(oracle(a_arr, b_arr)["cosine"], rel=1e-10)
    assert t.units_moved == 70 - 0  # reversing 70 columns moves every one of them


def test_matching_follows_the_graph_of_a_branching_model(tmp_path):
    # Two branches from the input, joined by an Add: in weight order a layer is not always
    # fed by the one before it, so the matching must follow the recorded graph.
    import keras

    from keras_weightwatch import WeightWatch

    def build():
        keras.utils.set_random_seed(3)
        inp = keras.Input((6, 6, 1))
        side = keras.layers.Conv2D(3, 3, padding="same", name="side")(inp)
        a = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inp)
        b = keras.layers.Conv2D(5, 3, padding="same", name="c2")(a)
        proj = keras.layers.Conv2D(5, 1, name="proj")(side)
        joined = keras.layers.Add(name="add")([proj, b])
        out = keras.layers.Dense(2, name="out")(keras.layers.Flatten(name="flat")(joined))
        model = keras.Model(inp, out)
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        return model

    x = np.random.default_rng(0).normal(size=(8, 6, 6, 1)).astype("float32")
    y = np.zeros((8, 2), "float32")
    model_a = build()
    model_b = build()
    def key(v):  # "side/kernel", with or without the model's name in front
        return "/".join(v.path.split("/")[-2:])

    w = {key(v): v.numpy() for v in model_a.weights}
    p_side, p_c1 = np.array([2, 0, 1]), np.array([3, 1, 0, 2])
    # B computes the same function with side's and c1's units shuffled
    w["side/kernel"], w["side/bias"] = w["side/kernel"][..., p_side], w["side/bias"][p_side]
    w["proj/kernel"] = w["proj/kernel"][:, :, p_side, :]
    w["c1/kernel"], w["c1/bias"] = w["c1/kernel"][..., p_c1], w["c1/bias"][p_c1]
    w["c2/kernel"] = w["c2/kernel"][:, :, p_c1, :]
    for v in model_b.weights:
        v.assign(w[key(v)])
    np.testing.assert_allclose(model_a.predict(x, verbose=0), model_b.predict(x, verbose=0),
                               atol=1e-5)
    for name, model in (("a", model_a), ("b", model_b)):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[WeightWatch(tmp_path / name, histograms=False)])
    run = load_run(tmp_path / "a")
    assert {layer.name: layer.inbound for layer in run.layers}["add"] == ("proj", "c2")
    result = diff_runs(tmp_path / "a", tmp_path / "b")
    by_name = {layer.name: layer for layer in result.layers}
    assert by_name["side"].cosine < 0.99 and by_name["c1"].cosine < 0.99
    for name in ("side", "c1", "c2", "proj", "out"):
        assert by_name[name].matched_cosine == pytest.approx(1.0, abs=1e-6), name


# --------------------------------------------------------------------------- the pieces


def test_best_matching_recovers_a_permutation_of_units():
    from keras_weightwatch.compare.matching import best_matching
    from keras_weightwatch.reductions import pair_sums_gram

    rng = np.random.default_rng(11)
    a = rng.normal(size=(30, 9))
    perm = rng.permutation(9)
    b = a[:, perm] + 0.01 * rng.normal(size=a.shape)
    _, gram = pair_sums_gram(a, b)
    got = best_matching(gram)
    # unit i of A is unit j of B where perm[j] == i
    assert np.array_equal(got, np.argsort(perm))


def test_best_matching_keeps_identical_units_in_place():
    from keras_weightwatch.compare.matching import best_matching
    from keras_weightwatch.reductions import pair_sums_gram

    a = np.ones((4, 5))  # every unit the same: every matching ties
    assert np.array_equal(best_matching(pair_sums_gram(a, a)[1]), np.arange(5))


@pytest.mark.parametrize("shape", [(8, 5), (3, 3, 4, 2), (2, 12, 3)])
def test_input_rows_permute_the_input_axis_like_numpy(shape):
    from keras_weightwatch.compare.matching import input_rows

    rng = np.random.default_rng(12)
    k = rng.normal(size=shape)
    n = 4 if len(shape) != 3 else 12
    carry = rng.permutation(n)
    rows = input_rows(shape, carry)
    if len(shape) == 2:  # a Dense kernel after a Flatten of (.., n) channels: rows repeat n
        expect = k.reshape(-1, n, shape[-1])[:, carry].reshape(-1, shape[-1])
    else:
        expect = np.take(k, carry, axis=-2).reshape(-1, shape[-1])
    np.testing.assert_array_equal(k.reshape(-1, shape[-1])[rows], expect)
    assert input_rows((3, 3, n + 1, 2), carry) is None  # the input axis is not the carried one


def test_carried_in_and_out_follow_the_graph_rules():
    from keras_weightwatch.compare.matching import carried_in, carried_out

    p, q = np.array([1, 0, 2]), np.array([2, 1, 0])
    assert carried_in(None, {}, p) is p  # no graph: from the previous layer
    assert np.array_equal(carried_in(("a", "b"), {"a": p, "b": p.copy()}, None), p)
    assert carried_in(("a", "b"), {"a": p, "b": q}, p) is None  # branches disagree
    assert carried_in(("a",), {"a": None}, p) is None
    assert carried_in((), {}, p) is None
    assert carried_out(p, q, True, [(3, 3, 3, 3)]) is q  # a matched kernel passes its own
    assert carried_out(p, None, True, [(3,)]) is None
    assert carried_out(p, None, False, [(3,), (3,)]) is p  # per channel: passes through
    assert carried_out(p, None, False, [(3,), (4,)]) is None
    assert carried_out(p, None, False, []) is None
