"""Matching units and carrying the matching along the graph: permuted copies, brute force."""

from __future__ import annotations

import numpy as np
import pytest
from compare_runs import cli, oracle, perm_of, permuted, weights, write_run

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
    # `d` is hidden (`o` is the output, whose units are never matched).
    o_arr = rng.normal(size=(70, 2)).astype("float32")
    layers = [("d", "Dense"), ("o", "Dense")]
    a = write_run(tmp_path / "a", [("epoch", 0, {"d/kernel": a_arr, "o/kernel": o_arr})],
                  layers=layers)
    b = write_run(tmp_path / "b", [("epoch", 0, {"d/kernel": b_arr[:, ::-1],
                                                 "o/kernel": o_arr[::-1]})], layers=layers)
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


# --------------------------------------------------------------------------- fixed units


def _graph_run(path, w):
    """A run with a recorded graph: d1 -> bn -> d2 -> classes -> softmax (the model output)."""
    from keras_weightwatch.capture import LayerInfo, ModelInfo, Snapshot, WeightSpec
    from keras_weightwatch.run import RunWriter

    graph = [("d1", "Dense", ("input",)), ("bn", "BatchNormalization", ("d1",)),
             ("d2", "Dense", ("bn",)), ("classes", "Dense", ("d2",)),
             ("softmax", "Activation", ("classes",))]
    specs = tuple(WeightSpec(key=k, path=f"model/{k}", layer=k.split("/")[0], shape=a.shape,
                             dtype="float32", trainable=True) for k, a in w.items())
    layers = tuple(LayerInfo(n, c, 1 if n != "softmax" else 0, 0, 0, inbound=i)
                   for n, c, i in graph)
    writer = RunWriter.open(str(path), ModelInfo("model", "Functional", layers, specs),
                            settings={}, versions={}, durable=False)
    snap = Snapshot(step=0, label="epoch", epoch=0, arrays=dict(w), logs={})
    writer.commit_snapshot(snap, writer.store_tensors(snap))
    writer.close()
    return str(path)


def _graph_weights(rng):
    def f(*shape):
        return rng.normal(size=shape).astype("float32")

    return {"d1/kernel": f(6, 7), "d1/bias": f(7), "bn/gamma": f(7), "bn/beta": f(7),
            "d2/kernel": f(7, 5), "d2/bias": f(5), "classes/kernel": f(5, 4),
            "classes/bias": f(4)}


def _shuffled_hidden(w, rng):
    """The same function (numpy forward pass checked) with d1's and d2's units shuffled."""
    p1, p2 = rng.permutation(7), rng.permutation(5)
    q = dict(w)
    q["d1/kernel"], q["d1/bias"] = w["d1/kernel"][:, p1], w["d1/bias"][p1]
    q["bn/gamma"], q["bn/beta"] = w["bn/gamma"][p1], w["bn/beta"][p1]
    q["d2/kernel"], q["d2/bias"] = w["d2/kernel"][p1][:, p2], w["d2/bias"][p2]
    q["classes/kernel"] = w["classes/kernel"][p2]

    def forward(v, x):
        h = np.tanh(x @ v["d1/kernel"] + v["d1/bias"]) * v["bn/gamma"] + v["bn/beta"]
        h = np.tanh(h @ v["d2/kernel"] + v["d2/bias"])
        return h @ v["classes/kernel"] + v["classes/bias"]

    x = rng.normal(size=(9, 6))
    np.testing.assert_allclose(forward(w, x), forward(q, x), rtol=1e-5)
    return q


def test_hidden_units_shuffled_match_exactly_and_the_outputs_keep_their_order(tmp_path):
    rng = np.random.default_rng(11)
    w = _graph_weights(rng)
    q = _shuffled_hidden(w, rng)
    result = diff_runs(_graph_run(tmp_path / "a", w), _graph_run(tmp_path / "b", q))
    for key in ("d1/kernel", "d1/bias", "bn/gamma", "bn/beta", "d2/kernel", "d2/bias",
                "classes/kernel"):
        t = result.tensor(key)
        assert t.cosine < 1 - 1e-6, key
        assert t.matched_cosine == pytest.approx(1.0, abs=1e-9), key
        assert t.matched_rel_l2 == pytest.approx(0.0, abs=1e-7), key
    assert result.tensor("d1/kernel").unit_order == tuple(int(np.flatnonzero(
        (q["d1/kernel"] == w["d1/kernel"][:, [i]]).all(axis=0))[0]) for i in range(7))
    classes = result.tensor("classes/kernel")
    assert classes.units_fixed and classes.units_moved == 0 and classes.unit_order is None
    bias = result.tensor("classes/bias")  # not permuted by anything: no matched value
    assert bias.identical and bias.matched_cosine is None and bias.cosine == 1.0
    layers = {layer.name: layer for layer in result.layers}
    assert layers["classes"].units_fixed == "a model output"
    assert layers["d1"].units_fixed is None and not result.tensor("d1/kernel").units_fixed


def test_fixed_units_named_by_the_caller_are_never_permuted(tmp_path):
    rng = np.random.default_rng(12)
    w = _graph_weights(rng)
    q = _shuffled_hidden(w, rng)
    a, b = _graph_run(tmp_path / "a", w), _graph_run(tmp_path / "b", q)
    result = diff_runs(a, b, fixed_units=["d2"])
    d2 = result.tensor("d2/kernel")
    assert d2.units_fixed and d2.units_moved == 0 and d2.unit_order is None
    # Its inputs are still aligned with d1's matching, its units are not: numpy reference.
    aligned = q["d2/kernel"][list(result.tensor("d1/kernel").unit_order)]
    assert d2.matched_cosine == pytest.approx(oracle(w["d2/kernel"], aligned)["cosine"],
                                              rel=1e-9)
    assert d2.matched_cosine < 0.99
    assert result.tensor("d2/bias").matched_cosine is None
    # Nothing is carried into `classes`: no matching applies to it at all.
    assert result.tensor("classes/kernel").matched_cosine is None
    assert {la.name: la.units_fixed for la in result.layers}["d2"] == "fixed by the caller"
    code, out, err = cli("diff", a, b, "--fixed", "d2", "--fixed", "d1")
    assert code == 0 and out.count("kept in order") == 3
    with pytest.raises(ValueError, match=r"names no layer.*Received: fixed_units=\['nope'\]"):
        diff_runs(a, b, fixed_units=["nope"])
    with pytest.raises(TypeError, match="Received: fixed_units=3"):
        diff_runs(a, b, fixed_units=3)


# ---------------------------------------------------- the bound that settles large layers


def _reference_matching(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """scipy's assignment on the float64 cosine matrix, with best_matching's tie bonus."""
    from scipy.optimize import linear_sum_assignment

    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a64, axis=0), np.linalg.norm(b64, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.nan_to_num((a64.T @ b64) / np.outer(na, nb))
    cos[np.diag_indices_from(cos)] += 1e-9
    r, c = linear_sum_assignment(cos, maximize=True)
    perm = np.empty(len(r), dtype=np.int64)
    perm[r] = c
    return perm


def _twin(seed: int, rows: int, units: int, noise: float, dtype: str = "float32"):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(rows, units)).astype(dtype)
    b = (a[:, rng.permutation(units)] + noise * rng.normal(size=a.shape)).astype(dtype)
    return a, b


def _count_full_matrices(monkeypatch) -> list[int]:
    from keras_weightwatch.compare import matching

    calls: list[int] = []
    full = matching.assign_cosines

    def counted(*args, **kwargs):
        calls.append(1)
        return full(*args, **kwargs)

    monkeypatch.setattr(matching, "assign_cosines", counted)  # the assignment of every pair
    return calls


@pytest.mark.parametrize(("noise", "settled"), [(0.02, True), (0.3, True), (3.0, False)])
def test_match_units_equals_scipy_on_the_full_matrix_whether_the_bound_settles_it(
        monkeypatch, noise, settled):
    from keras_weightwatch import reductions
    from keras_weightwatch.compare.matching import match_units

    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", 64 * 20)  # 20-row products
    calls = _count_full_matrices(monkeypatch)
    a, b = _twin(7, 640, 64, noise)
    m = match_units(a, b, None)
    expect = _reference_matching(a, b)
    np.testing.assert_array_equal(m.perm, expect)
    assert m.moved == int(np.sum(expect != np.arange(64)))
    # Close twins are settled by a bound; unrelated units (cosines near 0) need the matrix.
    assert bool(calls) is not settled
    # The sums are float64 and exact: against numpy on B as stored and on B matched.
    for sums, bb in ((m.sums, b), (m.matched, b[:, expect])):
        want = oracle(a, bb)
        assert sums.cosine() == pytest.approx(want["cosine"], rel=1e-12)
        assert sums.rel_l2() == pytest.approx(want["rel_l2"], rel=1e-12)
        assert sums.maxd == pytest.approx(want["max_abs"], rel=1e-12)


def test_a_bound_settles_carried_inputs_zero_units_and_float64_kernels(monkeypatch):
    from keras_weightwatch import reductions
    from keras_weightwatch.compare.matching import input_rows, match_units

    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", 48 * 30)
    calls = _count_full_matrices(monkeypatch)
    rng = np.random.default_rng(21)
    shape = (3, 3, 40, 48)  # a convolution whose 40 inputs were matched before
    a = rng.normal(size=shape)
    a[..., 5] = 0.0  # a dead unit in both runs
    units = rng.permutation(48)
    carry = rng.permutation(40)
    b = np.take(a, np.argsort(carry), axis=-2)[..., units] + 0.05 * rng.normal(size=shape)
    b[..., np.flatnonzero(units == 5)] = 0.0
    a2, b2 = a.reshape(-1, 48), b.reshape(-1, 48)
    rows = input_rows(shape, carry)
    m = match_units(a2, b2, rows, block=40)
    assert not calls
    expect = _reference_matching(a2, b2[rows])
    np.testing.assert_array_equal(m.perm, expect)
    assert expect[5] == int(np.flatnonzero(units == 5)[0])
    assert m.matched.cosine() == pytest.approx(oracle(a2, b2[rows][:, expect])["cosine"],
                                               rel=1e-12)
    assert m.sums.cosine() == pytest.approx(oracle(a2, b2)["cosine"], rel=1e-12)
    # A Dense kernel after a matched Dense layer: every row carried, one block of all rows.
    dense_a, dense_b = _twin(22, 300, 48, 0.05)
    carry = rng.permutation(300)
    dense_b = dense_b[np.argsort(carry)]
    rows = input_rows(dense_a.shape, carry)
    m = match_units(dense_a, dense_b, rows, block=300)
    assert not calls
    np.testing.assert_array_equal(m.perm, _reference_matching(dense_a, dense_b[rows]))
    assert m.matched.cosine() == pytest.approx(
        oracle(dense_a, dense_b[rows][:, m.perm])["cosine"], rel=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bounds_are_at_least_every_exact_cosine_as_rows_are_added(monkeypatch, dtype):
    from keras_weightwatch import reductions
    from keras_weightwatch.compare.matching import _Bound
    from keras_weightwatch.reductions import sums_per_unit

    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", 30 * 16)  # products of 16 rows
    a, b = _twin(4, 200, 30, 0.5, dtype)
    a[:, 2] *= 1e6  # one large unit: each unit is divided by its own norm
    b[:, 7] = 0.0  # a zero unit: its cosines are 0
    _, per = sums_per_unit(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    np.testing.assert_allclose(per.dots, np.sum(a64 * b64, axis=0), rtol=1e-12)
    na, nb = np.linalg.norm(a64, axis=0), np.linalg.norm(b64, axis=0)
    inv_b = np.where(nb > 0, 1 / np.where(nb > 0, nb, 1), 0.0)
    cos = (a64.T @ b64) / na[:, None] * inv_b[None, :]
    head = _Bound(a, b, None, per)
    for rows in (16, 40, 41, 64, 199, 200):  # each stage's rests replace the previous ones
        head.add_rows(rows)
        rest_a = np.linalg.norm(a64[rows:], axis=0) / na
        rest_b = np.linalg.norm(b64[rows:], axis=0) * inv_b
        expect = (a64[:rows].T @ b64[:rows]) / na[:, None] * inv_b[None, :]
        expect += np.outer(rest_a, rest_b)  # Cauchy-Schwarz on the rows not added
        assert np.all(np.abs(head.g - expect) <= head.margin()), rows
        assert head.margin() < 1e-4
        bound = head.bounds()
        want = head.g.astype(np.float64) + head.margin()
        want[np.diag_indices_from(want)] += 1e-9  # the tie bonus of a unit's own pair
        np.testing.assert_array_equal(bound, want)
        bound[np.diag_indices_from(bound)] -= 1e-9
        assert np.all(bound >= cos), rows
        others = np.where(np.eye(30, dtype=bool), -np.inf, expect).max(axis=1)
        np.testing.assert_allclose(head.off_diagonal_max(), others + head.margin(), atol=1e-6)
        assert np.all(head.off_diagonal_max() >= np.where(np.eye(30, dtype=bool), -2, cos).max(1))
        with np.errstate(invalid="ignore", divide="ignore"):
            own = np.sum(a64[:rows] * b64[:rows], axis=0) / (
                np.linalg.norm(a64[:rows], axis=0) * np.linalg.norm(b64[:rows], axis=0))
        np.testing.assert_allclose(head.estimate(np.arange(30)), own, atol=1e-5)
    np.testing.assert_allclose(head.cosines(), cos, atol=1e-5)  # every row: the cosines


def test_bounds_of_carried_rows_equal_numpy_on_b_reordered(monkeypatch):
    from keras_weightwatch import reductions
    from keras_weightwatch.compare.matching import _Bound
    from keras_weightwatch.reductions import sums_per_unit

    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", 40 * 24)
    a, b = _twin(5, 120, 40, 0.2)
    rows = np.random.default_rng(5).permutation(120)
    _, per = sums_per_unit(a, b)
    head = _Bound(a, b, rows, per)
    head.add_rows(30)
    a64, b64 = a.astype(np.float64), b[rows].astype(np.float64)
    na, nb = np.linalg.norm(a64, axis=0), np.linalg.norm(b64, axis=0)
    expect = (a64[:30].T @ b64[:30]) / np.outer(na, nb) + np.outer(
        np.linalg.norm(a64[30:], axis=0) / na, np.linalg.norm(b64[30:], axis=0) / nb)
    assert np.all(np.abs(head.g - expect) <= head.margin())


@pytest.mark.parametrize(("noise", "swapped"), [(0.01, 0), (0.2, 0), (0.2, 6), (0.3, 0),
                                               (0.45, 0), (0.3, 10)])
def test_units_in_place_are_settled_like_scipy_on_the_full_matrix(monkeypatch, noise, swapped):
    from keras_weightwatch import reductions
    from keras_weightwatch.compare.matching import match_units

    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", 96 * 50)
    calls = _count_full_matrices(monkeypatch)
    rng = np.random.default_rng(13)
    a = rng.normal(size=(800, 96)).astype("float32")
    order = np.arange(96)
    order[:swapped] = order[:swapped][::-1]  # a few units trade places, the rest stay
    b = (a[:, order] + noise * rng.normal(size=a.shape)).astype("float32")
    m = match_units(a, b, None)
    expect = _reference_matching(a, b)
    np.testing.assert_array_equal(m.perm, expect)
    assert m.moved == swapped and not calls
    want = oracle(a, b[:, expect])
    assert m.matched.cosine() == pytest.approx(want["cosine"], rel=1e-12)
    assert m.matched.rel_l2() == pytest.approx(want["rel_l2"], rel=1e-12)


@pytest.mark.parametrize("every_fraction", [False, True])
def test_the_full_matrix_after_a_bound_keeps_the_rows_it_added(monkeypatch, every_fraction):
    from keras_weightwatch import reductions
    from keras_weightwatch.compare import matching

    monkeypatch.setattr(reductions, "CHUNK_ELEMENTS", 64 * 20)
    calls = _count_full_matrices(monkeypatch)
    stops: list[tuple[int, int]] = []
    add_rows = matching._Bound.add_rows

    def recorded(self, stop):
        stops.append((self.done, stop))
        add_rows(self, stop)

    monkeypatch.setattr(matching._Bound, "add_rows", recorded)
    if every_fraction:  # every bound tried (and none settles unrelated units)
        monkeypatch.setattr(matching, "_likely", lambda *args: (True, 1.0))
    a, b = _twin(17, 640, 64, 3.0 if every_fraction else 1.2)
    m = matching.match_units(a, b, None)
    np.testing.assert_array_equal(m.perm, _reference_matching(a, b))
    assert len(calls) == 1
    assert stops == ([(0, 40), (40, 80), (80, 160), (160, 320), (320, 640)] if every_fraction
                     else [(0, 40), (40, 640)])


def test_a_run_against_itself_matches_every_unit_in_place_without_a_gram(tmp_path, monkeypatch):
    from keras_weightwatch.compare import matching

    def no_gram(*args, **kwargs):
        raise AssertionError("a bit-identical kernel needs no Gram product")

    monkeypatch.setattr(matching, "sums_and_gram", no_gram)
    monkeypatch.setattr(matching._Bound, "add_rows", no_gram)
    w = weights(np.random.default_rng(8))
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, w)])
    result = diff_runs(a, b)
    for key in ("conv1/kernel", "conv2/kernel", "dense/kernel"):
        t = result.tensor(key)
        assert t.identical and t.units_moved == 0 and t.matched_cosine == 1.0, key
        assert t.unit_order == tuple(range(w[key].shape[-1])), key
    # The next layer's inputs are carried in order, and recorded as such.
    assert result.tensor("conv2/kernel").input_order == tuple(range(w["conv1/kernel"].shape[-1]))


def test_nan_in_a_large_layer_matches_on_the_finite_values_like_the_full_matrix(monkeypatch):
    from keras_weightwatch.compare.matching import match_units

    calls = _count_full_matrices(monkeypatch)
    a, b = _twin(9, 320, 40, 0.02)
    a[3, 7] = np.nan
    m = match_units(a, b, None)
    assert calls  # no bound from NaN sums: the full matrix, NaN counted as 0
    finite = np.where(np.isfinite(a), a, 0.0)
    np.testing.assert_array_equal(m.perm, _reference_matching(finite, b))
    assert m.sums.nonfinite_a == 1 and np.isnan(m.matched.cosine())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_assign_cosines_matches_scipy_with_and_without_non_finite_entries(bad):
    from scipy.optimize import linear_sum_assignment

    from keras_weightwatch.compare.matching import TIE_BONUS, assign_cosines

    rng = np.random.default_rng(3)
    cos = rng.uniform(-1, 1, (12, 12))
    if bad is not None:
        cos[2, 5] = cos[7, 7] = cos[0, :] = bad
    want = np.where(np.isfinite(cos), cos, -2.0)
    want[np.diag_indices_from(want)] += TIE_BONUS
    rows, cols = linear_sum_assignment(want, maximize=True)
    got = cos.copy()
    perm = assign_cosines(got)
    np.testing.assert_array_equal(perm[rows], cols)
    np.testing.assert_array_equal(got, want)  # changed in place, as documented
