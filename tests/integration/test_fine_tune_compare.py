"""Comparisons of fine-tuned, quantized and re-sized models, on runs written by real fits.

Pretrain a Conv2D + Dense model with WeightWatch, enable LoRA (rank 2) on both, fit on into
a new run; quantize a Dense model to int8 and fit on; fit two widths of one model. Every
number is checked against numpy on the layers' own variables (`layer.kernel`, which Keras
computes as `base + (alpha/rank) A @ B`; `kernel_codes / kernel_scale` from `get_weights`).
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

from keras_weightwatch import diff_runs, drift, load_run
from keras_weightwatch.cli import main
from keras_weightwatch.report import render_diff
from keras_weightwatch.spectral import spectral, tensor_spectral

pytestmark = pytest.mark.slow

SAMPLES = np.random.default_rng(3).normal(size=(2, 6, 6, 1)).astype("float32")


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 6, 6, 1)).astype("float32"),
            rng.normal(size=(n, 1)).astype("float32"))


def _cnn(width=3, units=4):
    import keras

    return keras.Sequential([
        keras.Input((6, 6, 1)), keras.layers.Conv2D(width, 3, name="conv"),
        keras.layers.Flatten(name="flat"), keras.layers.Dense(units, name="dense"),
        keras.layers.Dense(1, name="out")])


def _fit(model, log_dir, epochs, lr, **kwargs):
    import keras

    from keras_weightwatch import WeightWatch

    x, y = _data()
    model.compile(optimizer=keras.optimizers.Adam(lr), loss="mse")
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0,
              callbacks=[WeightWatch(str(log_dir), histograms=False, **kwargs)])


def _arrays(layer) -> dict[str, np.ndarray]:
    """The layer's variables by name, and `layer.kernel` as Keras computes it."""
    out = {v.name: np.array(v.numpy(), copy=True) for v in layer.weights}
    out["effective"] = np.array(np.asarray(layer.kernel), copy=True)
    return out


def _new_run(root, before: set[str]) -> str:
    (made,) = set(os.listdir(root)) - before
    return str(root / made)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """(pretrained run, LoRA run, the layers' arrays before LoRA and after the fine-tune)."""
    import keras

    keras.utils.set_random_seed(0)
    root = tmp_path_factory.mktemp("lora")
    model = _cnn()
    _fit(model, root / "run", epochs=2, lr=0.01)
    before = {n: _arrays(model.get_layer(n)) for n in ("conv", "dense")}
    for name in ("conv", "dense"):
        model.get_layer(name).enable_lora(2)
    existing = set(os.listdir(root))
    _fit(model, root / "run", epochs=3, lr=0.05, if_exists="new", sample_images=SAMPLES)
    after = {n: _arrays(model.get_layer(n)) for n in ("conv", "dense")}
    return str(root / "run"), _new_run(root, existing), before, after


def _rel(x, y) -> float:
    x, y = np.float64(x), np.float64(y)
    return float(np.linalg.norm(y - x) / np.linalg.norm(x))


def test_diff_compares_the_effective_kernels_of_a_fine_tune(lora):
    pre, tuned, before, after = lora
    result = diff_runs(pre, tuned)
    for name in ("conv", "dense"):
        t = result.tensor(f"{name}/kernel")
        want = _rel(before[name]["kernel"], after[name]["effective"])
        assert want > 1e-3  # the fine-tune moved it: the stored base alone did not
        assert np.array_equal(after[name]["kernel"], before[name]["kernel"])
        assert t.status == "changed" and not t.identical
        assert t.rel_l2 == pytest.approx(want, rel=1e-5)
        assert (t.rule_a, t.rule_b) == (None, "lora")
        assert t.norm_b == pytest.approx(np.linalg.norm(np.float64(after[name]["effective"])),
                                         rel=1e-6)
        # its adapters are listed under it, not as tensors of the layer
        assert [(i.name, i.role, i.status, i.shape_b) for i in t.inputs] == [
            (f"{name}/lora_kernel_a", "a", "only_b", after[name]["lora_kernel_a"].shape),
            (f"{name}/lora_kernel_b", "b", "only_b", after[name]["lora_kernel_b"].shape)]
        layer = next(x for x in result.layers if x.name == name)
        assert [x.name for x in layer.tensors] == [f"{name}/kernel", f"{name}/bias"]
        assert not layer.structural
    assert result.counts()["only_b"] == 0
    assert {t.name for t in result.inputs} == {
        f"{n}/lora_kernel_{r}" for n in ("conv", "dense") for r in "ab"}


def test_the_diff_text_marks_effective_kernels_and_nests_their_adapters(lora):
    pre, tuned, _, _ = lora
    out = io.StringIO()
    assert main(["diff", pre, tuned], stdout=out) == 0
    lines = out.getvalue().splitlines()
    assert lines == render_diff(diff_runs(pre, tuned)).splitlines()
    for name in ("conv", "dense"):
        i = next(n for n, line in enumerate(lines) if line.startswith(f"  {name}/kernel (LoRA"))
        assert "(LoRA in B)" in lines[i] and "unchanged" not in lines[i]
        assert lines[i + 1].split()[:4] == ["+", "lora_kernel_a", "only", "in"]
        assert lines[i + 2].split()[:2] == ["+", "lora_kernel_b"]
    assert not any(line.startswith(("  conv/lora", "  dense/lora")) for line in lines)


def test_diff_within_the_lora_run_reports_each_adapter_under_its_kernel(lora):
    _, tuned, before, after = lora
    result = diff_runs(f"{tuned}@initial", tuned)
    for name in ("conv", "dense"):
        t = result.tensor(f"{name}/kernel")
        # at the initial snapshot B is zeros: the effective kernel is the pretrained one
        assert t.rel_l2 == pytest.approx(_rel(before[name]["kernel"], after[name]["effective"]),
                                         rel=1e-5)
        assert (t.rule_a, t.rule_b) == ("lora", "lora")
        a, b = t.inputs
        assert a.status == b.status == "changed"
        assert b.norm_a == 0.0
        assert b.norm_b == pytest.approx(np.linalg.norm(np.float64(after[name]["lora_kernel_b"])),
                                         rel=1e-6)
        run = load_run(tuned)
        a0 = run.tensor(f"{name}/lora_kernel_a", "initial")
        assert a.rel_l2 == pytest.approx(_rel(a0, after[name]["lora_kernel_a"]), rel=1e-5)


def test_drift_follows_the_effective_kernel(lora):
    _, tuned, before, after = lora
    d = drift(tuned)
    conv = next(x for x in d.layers if x.name == "conv")
    run = load_run(tuned)
    k0, b0 = before["conv"]["kernel"], run.tensor("conv/bias", run.steps[0])
    num = (np.sum((np.float64(after["conv"]["effective"]) - k0) ** 2)
           + np.sum((np.float64(after["conv"]["bias"]) - b0) ** 2))
    den = np.sum(np.float64(k0) ** 2) + np.sum(np.float64(b0) ** 2)
    assert conv.from_initial[-1] == pytest.approx(np.sqrt(num / den), rel=1e-5)
    assert {x.name for x in d.layers} == {"conv", "dense", "out"}


def test_spectral_of_a_lora_run_measures_the_effective_kernel(lora):
    _, tuned, _, after = lora
    got = spectral(tuned).tensors["dense/kernel"]
    want = tensor_spectral(after["dense"]["effective"], "Dense", "kernel")
    assert want is not None
    assert got.spectral_norm == pytest.approx(want.spectral_norm, rel=1e-5)
    assert got.norm == pytest.approx(want.norm, rel=1e-5)


def test_the_tabs_kernel_grid_responses_and_compare_use_the_effective_kernel(lora):
    from keras_weightwatch.images import kernel_grid
    from keras_weightwatch.responses import correlate
    from keras_weightwatch.tensorboard_plugin import content

    pre, tuned, before, after = lora
    run = load_run(tuned)
    grid = content.kernel(run, "conv/kernel", "last")
    want = kernel_grid(after["conv"]["effective"], max_tiles=content.MAX_TILES)
    assert grid.image.shape == want.image.shape
    assert np.abs(grid.image.astype(int) - want.image.astype(int)).max() <= 1
    base = kernel_grid(before["conv"]["kernel"], max_tiles=content.MAX_TILES)
    assert np.abs(grid.image.astype(int) - base.image.astype(int)).max() > 8
    layer, why = content.response_layer(run, "conv/kernel")
    assert layer is not None, why
    drawn = content.responses(run, layer, "last")
    np.testing.assert_allclose(drawn.responses, correlate(SAMPLES, after["conv"]["effective"]),
                               rtol=1e-4, atol=1e-5)
    body = content.compare_json(diff_runs(load_run(pre), run), load_run(pre), run, "a", "b")
    row = next(t for t in body["tensors"] if t["name"] == "conv/kernel")
    assert row["rule_b"] == "lora" and row["status"] == "changed"
    assert [i["name"] for i in row["inputs"]] == ["conv/lora_kernel_a", "conv/lora_kernel_b"]


def test_a_quantized_runs_analyses_read_the_dequantized_kernel(tmp_path):
    import keras

    from keras_weightwatch import WeightWatch

    keras.utils.set_random_seed(1)
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(64, 24)).astype("float32"), rng.normal(size=(64, 1)).astype("float32")
    model = keras.Sequential([keras.Input((24,)), keras.layers.Dense(16, name="dense"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=2, verbose=0,
              callbacks=[WeightWatch(str(tmp_path / "float"))])
    float_kernel = np.array(model.get_layer("dense").kernel.numpy(), copy=True)
    model.quantize("int8", filters="dense|out")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=1, verbose=0,
              callbacks=[WeightWatch(str(tmp_path / "int8"))])
    layer = model.get_layer("dense")
    named = {v.name: w for v, w in zip(layer.weights, layer.get_weights())}
    codes, scale = named["kernel"], named["kernel_scale"]
    assert codes.dtype == np.int8
    dequantized = codes.astype(np.float32) / scale
    got = spectral(str(tmp_path / "int8")).tensors["dense/kernel"]
    want = tensor_spectral(dequantized, "Dense", "kernel")
    assert want is not None
    assert got.spectral_norm == pytest.approx(want.spectral_norm, rel=1e-5)
    assert got.stable_rank == pytest.approx(want.stable_rank, rel=1e-5)
    t = diff_runs(str(tmp_path / "float"), str(tmp_path / "int8")).tensor("dense/kernel")
    assert (t.rule_a, t.rule_b) == (None, "int8")
    assert t.rel_l2 == pytest.approx(_rel(float_kernel, dequantized), rel=1e-4)
    assert [i.name for i in t.inputs] == ["dense/kernel_scale"]


def test_diff_across_two_widths_names_the_tensors_of_another_shape(tmp_path):
    import keras

    keras.utils.set_random_seed(2)
    narrow, wide = _cnn(width=3, units=8), _cnn(width=5, units=16)
    _fit(narrow, tmp_path / "narrow", epochs=1, lr=0.01)
    _fit(wide, tmp_path / "wide", epochs=1, lr=0.01)
    a, b = str(tmp_path / "narrow"), str(tmp_path / "wide")
    out = io.StringIO()
    assert main(["diff", a, b, "--images", str(tmp_path / "img")], stdout=out) == 0
    text = out.getvalue()
    for key, sa, sb in (("conv/kernel", (3, 3, 1, 3), (3, 3, 1, 5)), ("conv/bias", (3,), (5,)),
                        ("dense/kernel", (48, 8), (80, 16)), ("dense/bias", (8,), (16,)),
                        ("out/kernel", (8, 1), (16, 1))):
        assert f"  {key}" in text and f"shape {sa} -> {sb}" in text
    result = diff_runs(a, b)
    assert result.counts()["shape_changed"] == 5
    bias = result.tensor("out/bias")
    assert bias.status in ("changed", "unchanged")
    want_a = np.float64(narrow.get_layer("out").bias.numpy())
    want_b = np.float64(wide.get_layer("out").bias.numpy())
    assert bias.norm_a == pytest.approx(np.linalg.norm(want_a), rel=1e-6, abs=1e-12)
    assert bias.max_abs == pytest.approx(float(np.max(np.abs(want_b - want_a))), abs=1e-7)
    assert main(["diff", a, b, "--json"], stdout=io.StringIO()) == 0
    from keras_weightwatch.tensorboard_plugin import content

    body = content.compare_json(result, load_run(a), load_run(b), "narrow", "wide")
    assert body["counts"]["shape_changed"] == 5 and body["conv"] == []


def test_features_side_by_side_rank_by_the_effective_first_kernel(tmp_path):
    import keras

    from keras_weightwatch import WeightWatch

    keras.utils.set_random_seed(4)
    names = ["age", "dose", "weight", "height", "score"]
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 5)).astype("float32")
    y = (x @ rng.normal(size=(5, 1))).astype("float32")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="first"),
                              keras.layers.Dense(1, name="out")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    ww = {"feature_names": names, "top_k": 5, "histograms": False}
    model.fit(x, y, epochs=2, verbose=0, callbacks=[WeightWatch(str(tmp_path / "run"), **ww)])
    model.get_layer("first").enable_lora(2)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    existing = set(os.listdir(tmp_path))
    model.fit(x, y, epochs=3, verbose=0,
              callbacks=[WeightWatch(str(tmp_path / "run"), if_exists="new", **ww)])
    effective = np.float64(np.asarray(model.get_layer("first").kernel))
    tuned = _new_run(tmp_path, existing)
    f = diff_runs(str(tmp_path / "run"), tuned).features
    assert f is not None and f.ranked_by == "row_norm" and f.key_b == "first/kernel"
    norms = np.linalg.norm(effective, axis=1)
    assert {r.name: r.weight_b for r in f.rows} == pytest.approx(
        dict(zip(names, norms.tolist())), rel=1e-5)
    assert [r.name for r in f.rows] == [names[i] for i in np.argsort(-norms, kind="stable")]
    from keras_weightwatch.tensorboard_plugin import content

    run = load_run(tuned)
    weights = {w["key"]: w for w in content.summary(run, "tuned")["weights"]}
    assert weights["first/kernel"]["derived"] == "lora"
    assert weights["first/lora_kernel_b"]["part_of"] == "first/kernel"
    tab = content.features(run)
    assert tab["tables"][-1][0]["name"] == names[int(np.argmax(norms))]


def test_the_tabs_kernel_route_draws_each_steps_effective_kernel_over_a_frozen_base(lora):
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.plugins.base_plugin import TBContext
    from werkzeug.test import Client
    from werkzeug.wrappers import Response

    from keras_weightwatch.images import kernel_grid
    from keras_weightwatch.tensorboard_plugin import WeightWatchPlugin, content

    _, tuned, before, after = lora
    apps = WeightWatchPlugin(TBContext(logdir=os.path.dirname(tuned))).get_plugin_apps()
    client = Client(lambda env, start: apps[env["PATH_INFO"]](env, start), Response)
    name = os.path.basename(tuned)
    # the base's file is the same at both steps: the route must not serve one grid for both
    for step, kernel in (("initial", before["conv"]["kernel"]),
                         ("last", after["conv"]["effective"])):
        r = client.get("/kernel.png", query_string={"run": name, "key": "conv/kernel",
                                                    "step": step})
        assert r.status_code == 200, r.data[:300]
        got = np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB")).astype(int)
        want = kernel_grid(kernel, max_tiles=content.MAX_TILES).image.astype(int)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1, step


def test_a_fine_tune_continuing_its_run_diffs_before_lora_against_the_last_snapshot(tmp_path):
    import keras

    from keras_weightwatch import WeightWatch

    keras.utils.set_random_seed(5)
    x, y = _data(seed=5)
    model = _cnn()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    ww = {"sample_images": SAMPLES, "histograms": False}
    model.fit(x, y, epochs=2, verbose=0, callbacks=[WeightWatch(str(tmp_path / "run"), **ww)])
    before = {n: _arrays(model.get_layer(n)) for n in ("conv", "dense")}
    for name in ("conv", "dense"):
        model.get_layer(name).enable_lora(2)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    model.fit(x, y, epochs=4, initial_epoch=2, verbose=0,
              callbacks=[WeightWatch(str(tmp_path / "run"), **ww)])
    after = {n: _arrays(model.get_layer(n)) for n in ("conv", "dense")}
    assert os.listdir(tmp_path) == ["run"]  # one run, continued
    run = load_run(str(tmp_path / "run"))
    result = diff_runs(run, run, step_a=1, step_b="last")
    for name in ("conv", "dense"):
        t = result.tensor(f"{name}/kernel")
        assert (t.rule_a, t.rule_b, t.status) == (None, "lora", "changed")
        assert t.rel_l2 == pytest.approx(_rel(before[name]["kernel"], after[name]["effective"]),
                                         rel=1e-5)
        assert [(i.role, i.status) for i in t.inputs] == [("a", "only_b"), ("b", "only_b")]
    assert result.counts()["only_b"] == 0
    k_last, b_last = after["conv"]["effective"], after["conv"]["bias"]

    def layer_rel(k, b):
        num = np.sum((np.float64(k_last) - k) ** 2) + np.sum((np.float64(b_last) - b) ** 2)
        return np.sqrt(num / (np.sum(np.float64(k) ** 2) + np.sum(np.float64(b) ** 2)))

    conv_diff = next(x for x in result.layers if x.name == "conv")
    assert conv_diff.rel_l2 == pytest.approx(
        layer_rel(before["conv"]["kernel"], before["conv"]["bias"]), rel=1e-5)
    conv = next(x for x in drift(run).layers if x.name == "conv")
    assert conv.from_initial[-1] == pytest.approx(
        layer_rel(run.tensor("conv/kernel", "initial"), run.tensor("conv/bias", "initial")),
        rel=1e-5)
    spec = spectral(run).tensors["conv/kernel"]
    want = tensor_spectral(after["conv"]["effective"], "Conv2D", "kernel")
    assert want is not None and spec.spectral_norm == pytest.approx(want.spectral_norm, rel=1e-5)
