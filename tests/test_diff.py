"""`diff_runs`, `drift`, `weightwatch diff` and `drift`: runs made with numpy, numpy oracles."""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import pytest

from keras_weightwatch import WeightWatchError, diff_runs, drift
from keras_weightwatch.capture import LayerInfo, ModelInfo, Snapshot, WeightSpec
from keras_weightwatch.cli import main, render_diff, render_drift
from keras_weightwatch.run import RunWriter, load_run

LAYERS = [
    ("conv1", "Conv2D"),
    ("bn", "BatchNormalization"),
    ("conv2", "Conv2D"),
    ("dense", "Dense"),
    ("out", "Dense"),
]


def _weights(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A small CNN's weights: conv(1->4) bn conv(4->6) flatten(2x2x6) dense(24->5) dense(5->1)."""
    def f(*shape):
        return rng.normal(size=shape).astype("float32")

    return {
        "conv1/kernel": f(3, 3, 1, 4),
        "conv1/bias": f(4),
        "bn/gamma": f(4),
        "bn/beta": f(4),
        "bn/moving_mean": f(4),
        "bn/moving_variance": np.abs(f(4)),
        "conv2/kernel": f(3, 3, 4, 6),
        "conv2/bias": f(6),
        "dense/kernel": f(24, 5),
        "dense/bias": f(5),
        "out/kernel": f(5, 1),
        "out/bias": f(1),
    }


def write_run(path, snapshots, layers=LAYERS, settings=None) -> str:
    """Write a run directory without Keras: `snapshots` is a list of (label, step, arrays)."""
    first = snapshots[0][2]
    specs = tuple(
        WeightSpec(key=k, path=f"model/{k}", layer=k.rsplit("/", 1)[0], shape=a.shape,
                   dtype=a.dtype.name, trainable=True)
        for k, a in first.items()
    )
    info = ModelInfo("model", "Sequential", tuple(LayerInfo(n, c, 0, 0, 0) for n, c in layers),
                     specs)
    writer = RunWriter.open(str(path), info, settings=settings or {}, versions={}, durable=False)
    try:
        for label, step, arrays in snapshots:
            snap = Snapshot(step=step, label=label, epoch=None if label == "initial" else step,
                            arrays=dict(arrays),
                            logs={"loss": 1.0 / (step + 2)})
            writer.commit_snapshot(snap, writer.store_tensors(snap))
    finally:
        writer.close()
    return str(path)


def _epochs(n: int = 3, seed: int = 0) -> list[tuple[str, int, dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    w = _weights(rng)
    w["conv1/bias"][:] = 0  # zeros, as Keras initialises biases
    out = [("initial", -1, w)]
    for step in range(n - 1):
        w = {k: (v + 0.1 * (step + 1) * rng.normal(size=v.shape)).astype(v.dtype)
             for k, v in w.items()}
        w["bn/moving_variance"] = np.abs(w["bn/moving_variance"])
        w["out/bias"] = out[-1][2]["out/bias"]  # a frozen tensor
        out.append(("epoch", step, w))
    return out


def test_store_writes_non_c_order_arrays_as_they_are(tmp_path):
    # Fortran-ordered, strided and 0-d arrays come back equal from a RunWriter-written run.
    rng = np.random.default_rng(3)
    base = rng.normal(size=(6, 4)).astype("float32")
    arrays = {"f/kernel": np.asfortranarray(base), "s/kernel": base[:, ::2],
              "p/kernel": base[:, [3, 1, 0, 2]], "c/count": np.array(7, "int32")}
    path = str(tmp_path / "run")
    writer = RunWriter.open(path, ModelInfo("m", "Sequential", (), tuple(
        WeightSpec(key=k, path=f"m/{k}", layer=k.split("/")[0], shape=a.shape,
                   dtype=a.dtype.name, trainable=True) for k, a in arrays.items())),
        settings={}, versions={}, durable=False)
    snap = Snapshot(step=0, label="epoch", epoch=0, arrays=arrays, logs={})
    writer.commit_snapshot(snap, writer.store_tensors(snap))
    writer.close()
    got = load_run(path).weights(0)
    for k, a in arrays.items():
        assert got[k].shape == a.shape and got[k].dtype == a.dtype
        np.testing.assert_array_equal(got[k], a)


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", _epochs())


def permuted(w: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """The same network with the units of conv1, conv2 and dense permuted (and their inputs)."""
    rng = np.random.default_rng(seed)
    p1, p2, p3 = rng.permutation(4), rng.permutation(6), rng.permutation(5)
    while np.all(p1 == np.arange(4)):
        p1 = rng.permutation(4)
    q = dict(w)
    q["conv1/kernel"] = w["conv1/kernel"][..., p1]
    q["conv1/bias"] = w["conv1/bias"][p1]
    for k in ("gamma", "beta", "moving_mean", "moving_variance"):
        q[f"bn/{k}"] = w[f"bn/{k}"][p1]
    q["conv2/kernel"] = w["conv2/kernel"][:, :, p1, :][..., p2]
    q["conv2/bias"] = w["conv2/bias"][p2]
    # Flatten of (2, 2, 6) puts channels fastest: rows are (position, channel).
    q["dense/kernel"] = w["dense/kernel"].reshape(4, 6, 5)[:, p2, :].reshape(24, 5)[:, p3]
    q["dense/bias"] = w["dense/bias"][p3]
    q["out/kernel"] = w["out/kernel"][p3]
    return q


def _perm_of(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For each unit of `a`, the unit of `b` with the same sorted values (brute force)."""
    a2 = np.sort(a.reshape(-1, a.shape[-1]), axis=0)
    b2 = np.sort(b.reshape(-1, b.shape[-1]), axis=0)
    return np.array([next(j for j in range(b2.shape[1]) if np.array_equal(a2[:, i], b2[:, j]))
                     for i in range(a2.shape[1])])


def oracle(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    d = b64 - a64
    return {
        "rel_l2": np.linalg.norm(d) / np.linalg.norm(a64),
        "cosine": a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64)),
        "max_abs": np.max(np.abs(d)),
        "rms": np.sqrt(np.mean(d * d)),
    }


def _cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    code = main([str(a) for a in argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- the library


@pytest.mark.parametrize("step", ["initial", "0", "last"])
def test_a_run_diffed_with_itself_is_unchanged_everywhere(run_dir, step):
    result = diff_runs(f"{run_dir}@{step}", f"{run_dir}@{step}")
    run = load_run(run_dir)
    assert {t.name for t in result.tensors} == {s.key for s in run.specs}
    for t in result.tensors:
        assert t.status == "unchanged" and t.identical, t.name
        assert t.rel_l2 == 0.0 and t.cosine == 1.0 and t.max_abs == 0.0 and t.rms == 0.0
        arr = run.tensor(t.name, "initial" if step == "initial" else int(step) if step != "last"
                         else "last")
        assert t.norm_a == pytest.approx(np.linalg.norm(np.asarray(arr, np.float64)), rel=1e-12)
    for key in ("conv1/kernel", "conv2/kernel", "dense/kernel"):
        t = result.tensor(key)
        assert t.matched_cosine == pytest.approx(1.0, abs=1e-12) and t.units_moved == 0
    assert all(layer.unchanged for layer in result.layers)


def test_permuted_units_differ_raw_but_match_after_matching(tmp_path):
    w = _weights(np.random.default_rng(3))
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
            moved if key == "conv1/kernel" else int(np.sum(_perm_of(a_k, b_k) != np.arange(
                a_k.shape[-1])))), key
    layer = {lay.name: lay for lay in result.layers}["conv2"]
    assert layer.cosine < 1 - 1e-6 and layer.matched_cosine == pytest.approx(1.0, abs=1e-9)
    assert result.tensor("out/bias").identical


def test_a_planted_change_shows_with_exact_values_and_nowhere_else(tmp_path):
    w = _weights(np.random.default_rng(4))
    v = dict(w)
    v["dense/kernel"] = w["dense/kernel"].copy()
    v["dense/kernel"][2, 3] += 0.5
    v["dense/kernel"][7, 0] *= -3.0
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)])
    result = diff_runs(a, b)
    changed = [t for t in result.tensors if t.status != "unchanged"]
    assert [t.name for t in changed] == ["dense/kernel"]
    t = changed[0]
    expect = oracle(w["dense/kernel"], v["dense/kernel"])
    for name, value in expect.items():
        assert getattr(t, name) == pytest.approx(value, rel=1e-12), name
    assert result.layers[0].name == "dense"
    assert result.layers[0].rel_l2 == pytest.approx(
        np.linalg.norm(np.float64(v["dense/kernel"]) - w["dense/kernel"])
        / np.sqrt(np.sum(np.float64(w["dense/kernel"]) ** 2) + np.sum(np.float64(w["dense/bias"])
                                                                      ** 2)), rel=1e-12)
    assert all(x.identical for x in result.tensors if x.name != "dense/kernel")


def test_chunked_reduction_matches_numpy_on_a_tensor_larger_than_a_chunk(tmp_path, monkeypatch):
    from keras_weightwatch import diff as diff_module

    monkeypatch.setattr(diff_module, "CHUNK_ELEMENTS", 1000)
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


def test_tolerance_counts_a_tiny_change_as_unchanged_but_not_identical(tmp_path):
    w = _weights(np.random.default_rng(6))
    v = dict(w, **{"out/bias": w["out/bias"] + np.float32(1e-6)})
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)])
    assert diff_runs(a, b).tensor("out/bias").status == "changed"
    t = diff_runs(a, b, tolerance=1e-5).tensor("out/bias")
    assert t.status == "unchanged" and not t.identical
    assert t.max_abs == pytest.approx(float(abs(np.float64(v["out/bias"][0]) - w["out/bias"][0])))


def test_epoch_vs_epoch_within_one_run(run_dir):
    snaps = _epochs()
    result = diff_runs(f"{run_dir}@initial", f"{run_dir}@1")
    assert result.a.endswith("@initial") and result.b.endswith("@1")
    w0, w2 = snaps[0][2], snaps[2][2]
    for key in w0:
        t = result.tensor(key)
        if key == "out/bias":
            assert t.identical
            continue
        if key == "conv1/bias":  # zero initial bias: rel_l2 is infinite, cosine 0
            assert t.rel_l2 == np.inf and t.cosine == 0.0
            continue
        for name, value in oracle(w0[key], w2[key]).items():
            assert getattr(t, name) == pytest.approx(value, rel=1e-10), (key, name)


def test_tensors_only_in_one_run_or_of_another_shape(tmp_path):
    w = _weights(np.random.default_rng(7))
    v = {k: x for k, x in w.items() if not k.startswith("out/")}
    v["dense/kernel"] = np.ones((24, 7), "float32")
    v["extra/kernel"] = np.ones((7, 2), "float32")
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)], layers=LAYERS[:4] + [("extra", "Dense")])
    result = diff_runs(a, b)
    status = {t.name: t.status for t in result.tensors}
    assert status["out/kernel"] == status["out/bias"] == "only_a"
    assert status["extra/kernel"] == "only_b"
    assert status["dense/kernel"] == "shape_changed"
    assert result.tensor("dense/kernel").shape_b == (24, 7)
    assert all(layer.structural for layer in result.layers[:3])
    assert set(status) == set(w) | set(v)


def test_layer_filter_and_argument_errors(run_dir):
    result = diff_runs(run_dir + "@0", run_dir, layer="^conv")
    assert {t.name for t in result.tensors} == {"conv1/kernel", "conv1/bias", "conv2/kernel",
                                               "conv2/bias"}
    with pytest.raises(ValueError, match=r"Received: tolerance=-1"):
        diff_runs(run_dir, run_dir, tolerance=-1)
    with pytest.raises(TypeError, match=r"Received: tolerance='x'"):
        diff_runs(run_dir, run_dir, tolerance="x")
    with pytest.raises(ValueError, match=r"Received: layer='\('"):
        diff_runs(run_dir, run_dir, layer="(")
    with pytest.raises(ValueError, match=r"Received: max_match_units=0"):
        diff_runs(run_dir, run_dir, max_match_units=0)
    with pytest.raises(TypeError, match=r"Received: run=3"):
        diff_runs(3, run_dir)
    with pytest.raises(WeightWatchError, match=r"no snapshot at step 9"):
        diff_runs(run_dir + "@9", run_dir)
    with pytest.raises(WeightWatchError, match=r"matches 'nothing'"):
        diff_runs(run_dir, run_dir, layer="nothing")


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


def test_drift_per_layer_matches_numpy(run_dir):
    snaps = _epochs()
    d = drift(run_dir)
    assert d.steps == ("initial", "0", "1")
    names = [layer.name for layer in d.layers]
    assert names == ["conv1", "bn", "conv2", "dense", "out"]
    for layer in d.layers:
        keys = [k for k in snaps[0][2] if k.startswith(layer.name + "/")]

        def rel(x, y, keys=keys):
            num = sum(np.sum((np.float64(y[k]) - x[k]) ** 2) for k in keys)
            den = sum(np.sum(np.float64(x[k]) ** 2) for k in keys)
            return np.sqrt(num / den)

        expect_step = [rel(snaps[i][2], snaps[i + 1][2]) for i in range(2)]
        expect_total = [rel(snaps[0][2], snaps[i + 1][2]) for i in range(2)]
        assert layer.step_change == pytest.approx(expect_step, rel=1e-10)
        assert layer.from_initial == pytest.approx(expect_total, rel=1e-10)


def test_drift_needs_two_snapshots(tmp_path):
    one = write_run(tmp_path / "one", _epochs(1))
    with pytest.raises(WeightWatchError, match="at least two snapshots"):
        drift(one)


# --------------------------------------------------------------------------- the CLI


def test_cli_diff_prints_layers_most_changed_first_in_80_columns(tmp_path):
    w = _weights(np.random.default_rng(8))
    v = dict(w, **{"conv2/kernel": w["conv2/kernel"] * 2, "dense/bias": w["dense/bias"] + 1})
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)])
    code, out, err = _cli("diff", a, b)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"A  {a}@0" and lines[1] == f"B  {b}@0"
    assert all(len(line) <= 80 for line in lines[2:])
    assert "12 tensors: 2 changed, 10 unchanged" in out
    result = diff_runs(a, b)
    order = [lay.name for lay in result.layers if not lay.unchanged]
    sq = {k: np.sum(np.float64(x) ** 2) for k, x in w.items()}
    layer_rel = {
        "conv2": np.sqrt(sq["conv2/kernel"] / (sq["conv2/kernel"] + sq["conv2/bias"])),
        "dense": np.sqrt(np.sum((np.float64(v["dense/bias"]) - w["dense/bias"]) ** 2)
                         / (sq["dense/kernel"] + sq["dense/bias"])),
    }
    assert order == sorted(layer_rel, key=lambda n: -layer_rel[n])
    for name in order:
        assert result.layers[order.index(name)].rel_l2 == pytest.approx(layer_rel[name], rel=1e-12)
    row = next(line for line in lines if line.startswith("  conv2/kernel"))
    assert row.split()[1:3] == [f"{1.0:.4g}", f"{1.0:.4f}"]
    layer_rows = [i for i, x in enumerate(lines) if x.split()[:1] in (["conv2"], ["dense"])]
    assert [lines[i].split()[0] for i in layer_rows] == order
    assert any(line.split() == ["conv1", "identical"] for line in lines)


def test_cli_diff_json_has_every_tensor_with_name_rel_l2_and_cosine(tmp_path):
    w = _weights(np.random.default_rng(9))
    v = permuted(w)
    del v["out/bias"]
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)])
    code, out, err = _cli("diff", a, b, "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    tensors = {t["name"]: t for t in doc["tensors"]}
    assert set(tensors) == set(w)
    for key in v:
        assert tensors[key]["rel_l2"] == pytest.approx(oracle(w[key], v[key])["rel_l2"], rel=1e-9)
        assert tensors[key]["cosine"] == pytest.approx(oracle(w[key], v[key])["cosine"], rel=1e-9)
    assert tensors["out/bias"]["status"] == "only_a" and tensors["out/bias"]["rel_l2"] is None
    assert tensors["conv1/kernel"]["matched_cosine"] == pytest.approx(1.0, abs=1e-9)


def test_cli_diff_layer_filter_and_epoch_vs_epoch(run_dir):
    code, out, err = _cli("diff", f"{run_dir}@initial", f"{run_dir}@0", "--layer", "^dense/",
                          "--json")
    assert code == 0 and err == ""
    doc = json.loads(out)
    assert [t["name"] for t in doc["tensors"]] == ["dense/kernel", "dense/bias"]
    snaps = _epochs()
    for t in doc["tensors"]:
        expect = oracle(snaps[0][2][t["name"]], snaps[1][2][t["name"]])
        assert t["rel_l2"] == pytest.approx(expect["rel_l2"], rel=1e-10)
        assert t["max_abs"] == pytest.approx(expect["max_abs"], rel=1e-10)
    assert doc["a"].endswith("@initial") and doc["b"].endswith("@0")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["diff", "{tmp}/missing", "{run}"], "no such run directory"),
        (["diff", "{run}@7", "{run}"], "no snapshot at step 7"),
        (["diff", "{run}@seven", "{run}"], "is not a step"),
        (["diff", "{run}", "{other}"], "no weight tensor in common"),
        (["diff", "{run}", "{run}", "--layer", "nothing"], "matches 'nothing'"),
        (["drift", "{tmp}/missing"], "no such run directory"),
        (["drift", "{one}"], "at least two snapshots"),
    ],
)
def test_cli_errors_are_one_line_on_stderr_and_exit_2(tmp_path, run_dir, argv, message):
    other = write_run(tmp_path / "other", [("epoch", 0, {"x/kernel": np.ones((2, 2), "f4")})],
                      layers=[("x", "Dense")])
    one = write_run(tmp_path / "one", _epochs(1))
    args = [a.format(tmp=tmp_path, run=run_dir, other=other, one=one) for a in argv]
    code, out, err = _cli(*args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("weightwatch: error: ") and message in err
    assert "Traceback" not in err


def test_cli_usage_errors_exit_2(run_dir, capsys):
    for argv in (["diff", run_dir, run_dir, "--layer", "("],
                 ["diff", run_dir, run_dir, "--tolerance", "-1"], ["diff", run_dir]):
        code, out, _ = _cli(*argv)
        assert code == 2 and out == ""
        assert "usage: weightwatch" in capsys.readouterr().err


def test_cli_without_scipy_names_the_extra(run_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    code, out, err = _cli("diff", run_dir + "@0", run_dir)
    assert code == 2 and "pip install 'keras-weightwatch[diff]'" in err
    code, out, err = _cli("diff", run_dir + "@0", run_dir, "--no-match")
    assert code == 0 and "conv1/kernel" in out


def test_cli_drift_table_and_json(run_dir):
    code, out, err = _cli("drift", run_dir)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"run        {run_dir}" and lines[1] == "snapshots  3: initial, 0, 1"
    assert all(len(line) <= 80 for line in lines[1:])
    d = drift(run_dir)
    for layer in d.layers:
        row = next(line for line in lines if line.split()[:1] == [layer.name]).split()
        assert len(row[1]) == 2 and set(row[1]) <= set("▁▂▃▄▅▆▇█")
        assert float(row[2]) == pytest.approx(layer.step_change[-1], rel=1e-3)
        assert float(row[3]) == pytest.approx(max(layer.step_change), rel=1e-3)
        assert float(row[4]) == pytest.approx(layer.from_initial[-1], rel=1e-3)
    code, out, err = _cli("drift", run_dir, "--json", "--layer", "conv")
    doc = json.loads(out)
    assert [x["name"] for x in doc["layers"]] == ["conv1", "conv2"]
    assert doc["layers"][0]["step_change"] == pytest.approx(list(d.layers[0].step_change))
    assert render_drift(d).splitlines()[0] == lines[0]


def test_cli_images_writes_a_b_and_difference_grids_for_each_conv_layer(run_dir, tmp_path):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    from keras_weightwatch.images import kernel_grid

    tb = tmp_path / "tb"
    code, out, err = _cli("diff", f"{run_dir}@initial", run_dir, "--images", tb)
    assert code == 0 and err == ""
    acc = pea.EventAccumulator(str(tb), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert tags == {f"{k}/{s}" for k in ("conv1/kernel", "conv2/kernel")
                    for s in ("A", "B", "B_minus_A")}
    snaps = _epochs()
    import zlib

    for t in sorted(tags):
        (event,) = acc.Tensors(t)
        w, h, png = tensor_util.make_ndarray(event.tensor_proto)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        key, which = t.rsplit("/", 1)
        a, b = snaps[0][2][key].astype(np.float64), snaps[2][2][key].astype(np.float64)
        grid = kernel_grid({"A": a, "B": b, "B_minus_A": b - a}[which])
        assert (int(w), int(h)) == (grid.image.shape[1], grid.image.shape[0])
        # Decode the PNG's pixels (filter 0 rows) and compare with the grid.
        idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
        raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(int(h), -1)
        assert np.array_equal(raw[:, 1:].reshape(grid.image.shape), grid.image)
    code, out, err = _cli("diff", run_dir, run_dir, "--images", tb)
    assert code == 2 and "already holds TensorBoard event files" in err
    assert os.path.isdir(tb)


def test_non_finite_values_are_counted_and_flagged(tmp_path):
    snaps = _epochs()
    a = write_run(tmp_path / "a", snaps)
    planted = {k: v.copy() for k, v in snaps[-1][2].items()}
    planted["dense/kernel"].flat[[0, 5, 7]] = [np.nan, np.inf, -np.inf]
    b = write_run(tmp_path / "b", snaps[:-1] + [("epoch", snaps[-1][1], planted)])
    result = diff_runs(a, b)
    expected_b = {k: int(np.size(v) - np.isfinite(v).sum()) for k, v in planted.items()}
    for t in result.tensors:
        assert (t.nonfinite_a, t.nonfinite_b) == (0, expected_b[t.name]), t.name
    t = result.tensor("dense/kernel")
    assert t.status == "changed" and np.isnan(t.max_abs) and np.isnan(t.rel_l2)
    text = render_diff(result)
    assert "NON-FINITE values in 1" in text.splitlines()[2]
    assert "NON-FINITE: 0 NaN/Inf in A, 3 in B" in text
    doc = result.to_json()
    row = next(r for r in doc["tensors"] if r["name"] == "dense/kernel")
    assert (row["nonfinite_a"], row["nonfinite_b"]) == (0, 3)
    # the same run with itself: identical, and still flagged
    same = diff_runs(b, b).tensor("dense/kernel")
    assert same.identical and (same.nonfinite_a, same.nonfinite_b) == (3, 3)
    assert "NON-FINITE: dense/kernel holds 3 NaN/Inf in A, 3 in B" in render_diff(diff_runs(b, b))


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
