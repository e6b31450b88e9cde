"""`diff_runs` executing its plan: runs made with numpy, numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
from compare_runs import LAYERS, epochs, oracle, weights, write_run

from keras_weightwatch import WeightWatchError, diff_runs
from keras_weightwatch.capture import ModelInfo, Snapshot, WeightSpec
from keras_weightwatch.report import render_diff
from keras_weightwatch.run import RunWriter, load_run


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", epochs())


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


def test_a_planted_change_shows_with_exact_values_and_nowhere_else(tmp_path):
    w = weights(np.random.default_rng(4))
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


def test_tolerance_counts_a_tiny_change_as_unchanged_but_not_identical(tmp_path):
    w = weights(np.random.default_rng(6))
    v = dict(w, **{"out/bias": w["out/bias"] + np.float32(1e-6)})
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)])
    assert diff_runs(a, b).tensor("out/bias").status == "changed"
    t = diff_runs(a, b, tolerance=1e-5).tensor("out/bias")
    assert t.status == "unchanged" and not t.identical
    assert t.max_abs == pytest.approx(float(abs(np.float64(v["out/bias"][0]) - w["out/bias"][0])))


def test_epoch_vs_epoch_within_one_run(run_dir):
    snaps = epochs()
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
    w = weights(np.random.default_rng(7))
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


def test_non_finite_values_are_counted_and_flagged(tmp_path):
    snaps = epochs()
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


def _stored(arrays, spectral=True, gradients=True, seed=0):
    """Statistics a callback would store: each kernel's spectral metrics (from `spectral`) and
    planted gradient norms of every weight."""
    from keras_weightwatch.spectral import tensor_spectral

    rng = np.random.default_rng(seed)
    layer_class = dict(LAYERS)
    stats = {}
    for key, a in arrays.items():
        st = {}
        m = tensor_spectral(a, layer_class[key.split("/")[0]], key.split("/")[1])
        if spectral and m is not None:
            st.update(m.to_stats())
        if gradients:
            g = float(rng.uniform(0.1, 1.0))
            w = float(np.linalg.norm(a))
            st.update(grad_norm=g, **({"grad_to_weight": g / w} if w else {}))
        stats[key] = st
    return stats


def test_diff_shows_the_spectral_and_gradient_numbers_both_snapshots_store(tmp_path):
    import json
    import math

    from compare_runs import cli

    snaps = epochs(3)
    planted = [(label, step, arrays, _stored(arrays, seed=i))
               for i, (label, step, arrays) in enumerate(snaps)]
    planted[1] = planted[1][:3] + (_stored(planted[1][2], spectral=False, seed=1),)
    path = write_run(tmp_path / "run", planted)
    run = load_run(path)
    result = diff_runs(f"{path}@initial", f"{path}@1")
    a, b = run.snapshot("initial").stats, run.snapshot(1).stats
    kernels = {"conv1/kernel", "conv2/kernel", "dense/kernel", "out/kernel"}
    for t in result.tensors:
        assert t.gradients_a.grad_norm == a[t.name]["grad_norm"]
        assert t.gradients_b.grad_to_weight == b[t.name]["grad_to_weight"]
        ratio_a = a[t.name].get("grad_to_weight", math.nan)  # absent where ||W|| = 0
        assert t.gradients_a.grad_to_weight == ratio_a or math.isnan(ratio_a)
        if t.name not in kernels:
            assert t.spectral_a is None and t.spectral_b is None
            continue
        for name in ("alpha", "alpha_weighted", "stable_rank", "spectral_norm", "log_norm"):
            for got, stats in ((getattr(t.spectral_a, name), a), (getattr(t.spectral_b, name), b)):
                want = stats[t.name][name]
                missing = want is None or math.isnan(want)  # not computable: null or NaN
                assert got == want or (missing and math.isnan(got)), (t.name, name)
    dense = result.tensor("dense/kernel")
    assert dense.spectral_a.spectral_norm == pytest.approx(
        np.linalg.norm(snaps[0][2]["dense/kernel"].astype(np.float64), 2) ** 2, rel=1e-12)
    assert math.isnan(dense.spectral_a.alpha)  # 5 eigenvalues: no fit, stored as null
    # JSON: the same numbers, NaN spelled "NaN"; a snapshot without spectral metrics: null.
    code, out, _ = cli("diff", f"{path}@initial", f"{path}@1", "--json")
    doc = {t["name"]: t for t in json.loads(out)["tensors"]}
    assert doc["dense/kernel"]["spectral_a"]["stable_rank"] == a["dense/kernel"]["stable_rank"]
    assert doc["dense/kernel"]["spectral_a"]["alpha"] == "NaN"
    assert doc["dense/kernel"]["gradients_b"]["grad_norm"] == b["dense/kernel"]["grad_norm"]
    mid = diff_runs(f"{path}@0", f"{path}@1")
    assert all(t.spectral_a is None for t in mid.tensors)
    assert all(t.gradients_a is not None for t in mid.tensors)
    # Text: the spectral section only where both store them; gradients A -> B.
    text = render_diff(result)
    section = text.split("spectral metrics stored in both snapshots", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("dense/kernel "))
    sr_a, sr_b = a["dense/kernel"]["stable_rank"], b["dense/kernel"]["stable_rank"]
    cells = row.split()
    assert cells[1:4] == ["NaN", "->", "NaN"]
    assert float(cells[4]) == pytest.approx(sr_a, rel=1e-3)
    assert float(cells[6]) == pytest.approx(sr_b, rel=1e-3)
    grads = text.split("gradient norms on the probe batch", 1)[1]
    row = next(line for line in grads.splitlines() if line.startswith("conv1/bias "))
    assert float(row.split()[1]) == pytest.approx(a["conv1/bias"]["grad_norm"], rel=1e-3)
    assert "spectral metrics stored" not in render_diff(mid)
    assert "gradient norms on the probe batch" in render_diff(mid)


def test_diff_of_runs_without_stored_numbers_has_none(run_dir):
    result = diff_runs(f"{run_dir}@initial", run_dir)
    assert all(t.spectral_a is t.spectral_b is t.gradients_a is t.gradients_b is None
               for t in result.tensors)
    assert all(t.to_json()["spectral_a"] is None for t in result.tensors)
    text = render_diff(result)
    assert "spectral metrics stored" not in text and "gradient norms on" not in text


# --------------------------------------------------------------- effective kernels


def _lora(name, scale=0.5):
    from keras_weightwatch.run import Derivation

    return Derivation(f"{name}/kernel", "lora",
                      {"base": f"{name}/kernel", "a": f"{name}/lora_kernel_a",
                       "b": f"{name}/lora_kernel_b"}, {"scale": scale, "rank": 2}, name)


def _with_adapters(w, rng, b_zero=False):
    out = dict(w)
    out["dense/lora_kernel_a"] = rng.normal(size=(24, 2)).astype("float32")
    out["dense/lora_kernel_b"] = (np.zeros((2, 5), "float32") if b_zero
                                  else rng.normal(size=(2, 5)).astype("float32"))
    return out


def _eff(w, scale=0.5):
    return np.float64(w["dense/kernel"]) + scale * (
        np.float64(w["dense/lora_kernel_a"]) @ np.float64(w["dense/lora_kernel_b"]))


def test_a_lora_kernel_is_compared_as_its_effective_kernel_with_adapters_under_it(tmp_path):
    rng = np.random.default_rng(11)
    w = weights(rng)
    v = _with_adapters(w, rng)  # the same stored base: only the adapters differ
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)], derived=[_lora("dense")])
    result = diff_runs(a, b)
    t = result.tensor("dense/kernel")
    assert t.status == "changed" and (t.rule_a, t.rule_b) == (None, "lora")
    for name, value in oracle(w["dense/kernel"], _eff(v)).items():
        assert getattr(t, name) == pytest.approx(value, rel=1e-6), name
    assert [(i.name, i.status, i.part_of, i.role) for i in t.inputs] == [
        ("dense/lora_kernel_a", "only_b", "dense/kernel", "a"),
        ("dense/lora_kernel_b", "only_b", "dense/kernel", "b")]
    dense = next(x for x in result.layers if x.name == "dense")
    assert [x.name for x in dense.tensors] == ["dense/kernel", "dense/bias"]
    assert not dense.structural and result.counts()["only_b"] == 0
    assert result.tensor("dense/lora_kernel_b").status == "only_b"
    text = render_diff(result).splitlines()
    i = text.index(next(x for x in text if x.startswith("  dense/kernel (LoRA in B)")))
    assert text[i + 1].split()[:2] == ["+", "lora_kernel_a"]
    assert text[i + 2].split()[:2] == ["+", "lora_kernel_b"]
    json_row = next(x for x in result.to_json()["tensors"] if x["name"] == "dense/kernel")
    assert [x["name"] for x in json_row["inputs"]] == ["dense/lora_kernel_a",
                                                       "dense/lora_kernel_b"]


def test_adapters_that_moved_with_b_at_zero_leave_the_effective_kernel_unchanged(tmp_path):
    rng = np.random.default_rng(12)
    w = _with_adapters(weights(rng), rng, b_zero=True)
    v = dict(w, **{"dense/lora_kernel_a": w["dense/lora_kernel_a"] + 1.0})
    a = write_run(tmp_path / "a", [("epoch", 0, w)], derived=[_lora("dense")])
    b = write_run(tmp_path / "b", [("epoch", 0, v)], derived=[_lora("dense")])
    result = diff_runs(a, b)
    t = result.tensor("dense/kernel")
    assert t.status == "unchanged" and not t.identical and t.max_abs == 0.0
    assert [i.status for i in t.inputs] == ["changed", "unchanged"]
    assert t.inputs[0].rel_l2 == pytest.approx(
        oracle(w["dense/lora_kernel_a"], v["dense/lora_kernel_a"])["rel_l2"], rel=1e-10)
    text = render_diff(result)
    assert "  dense/kernel (LoRA)" in text and "+ lora_kernel_a" in text
    # the same adapters under another scale: another effective kernel, never "identical"
    c = write_run(tmp_path / "c", [("epoch", 0, _with_adapters(w, rng))],
                  derived=[_lora("dense", 0.5)])
    d = write_run(tmp_path / "d", [("epoch", 0, load_run(c).weights(0))],
                  derived=[_lora("dense", 2.0)])
    t = diff_runs(c, d).tensor("dense/kernel")
    assert not t.identical and t.status == "changed"


def _pack_int4(codes):
    """Two signed 4-bit codes per byte along the last axis, the low nibble first."""
    padded = np.concatenate([codes, np.zeros((*codes.shape[:-1], codes.shape[-1] % 2), "int8")],
                            axis=-1)
    low, high = padded[..., 0::2], padded[..., 1::2]
    return ((low & 0x0F) | (high << 4)).astype(np.int8)


def test_an_int4_kernel_is_compared_by_its_unpacked_shape_with_a_float_one(tmp_path):
    from keras_weightwatch.run import Derivation

    rng = np.random.default_rng(13)
    w = weights(rng)
    codes = rng.integers(-8, 8, size=(24, 5)).astype("int8")
    scale = rng.uniform(1.0, 4.0, size=5).astype("float32")
    v = dict(w, **{"dense/kernel": _pack_int4(codes), "dense/kernel_scale": scale})
    d = Derivation("dense/kernel", "int4", {"codes": "dense/kernel", "scale": "dense/kernel_scale"},
                   {"length": 5, "scale_ops": []}, "dense")
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)], derived=[d])
    t = diff_runs(a, b).tensor("dense/kernel")
    assert v["dense/kernel"].shape == (24, 3)
    assert t.status == "changed" and t.shape_b == (24, 5) and t.rule_b == "int4"
    want = oracle(w["dense/kernel"], codes.astype(np.float64) / scale)
    assert t.rel_l2 == pytest.approx(want["rel_l2"], rel=1e-6)
    assert [i.name for i in t.inputs] == ["dense/kernel_scale"]
