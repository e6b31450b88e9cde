"""The WeightWatch tab's routes, called through werkzeug's test client on runs written by `fit`.

Every number is checked against an independent reference: `diff_runs` for the compare
table, `kernel_grid` for the kernel images (decoded with Pillow), numpy on `load_run`'s
arrays for the heatmaps and feature weights, `health.diagnose` for the health findings.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import warnings

import numpy as np
import pytest

from keras_weightwatch import WeightWatchWarning, diff_runs, load_run
from keras_weightwatch.health import diagnose
from keras_weightwatch.images import kernel_grid

pytest.importorskip("tensorboard")
from tensorboard.plugins.base_plugin import TBContext  # noqa: E402
from werkzeug.test import Client  # noqa: E402
from werkzeug.wrappers import Response  # noqa: E402

from keras_weightwatch.tensorboard_plugin import WeightWatchPlugin  # noqa: E402

FEATURES = ["age", "dose", "weight", "height", "score"]
SAMPLES = np.random.default_rng(7).uniform(size=(3, 8, 8, 1)).astype("float32")


def _feature_data():
    """Five features of which `weight` and `height` are correlated (r about 0.99)."""
    x = np.random.default_rng(8).normal(size=(64, 5))
    x[:, 3] = 2.0 * x[:, 2] + 0.1 * x[:, 3]
    return x


def _cnn(seed: int):
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv1"),
            keras.layers.Conv2D(6, 3, activation="relu", name="conv2"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(3, name="out"),
        ]
    )


def _fit(model, log_dir, epochs=2, **kwargs):
    from keras_weightwatch import WeightWatch

    rng = np.random.default_rng(0)
    n_in = model.input_shape[1:]
    x = rng.normal(size=(32, *n_in)).astype("float32")
    y = rng.normal(size=(32, model.output_shape[-1])).astype("float32")
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0,
              callbacks=[WeightWatch(str(log_dir), histograms=False, **kwargs)])


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    import keras

    root = tmp_path_factory.mktemp("tb") / "logs"
    _fit(_cnn(1), root / "cnn-a", epochs=3, sample_images=SAMPLES)
    _fit(_cnn(2), root / "group/cnn-b", epochs=3)
    linear = keras.Sequential([keras.Input((5,)), keras.layers.Dense(1, name="linear")])
    _fit(linear, root / "linear", feature_names=FEATURES, top_k=3, feature_data=_feature_data())
    return root


@pytest.fixture
def client(logdir):
    return _client(logdir)


def _client(logdir):
    plugin = WeightWatchPlugin(TBContext(logdir=str(logdir)))
    apps = plugin.get_plugin_apps()

    def app(environ, start_response):
        path = environ["PATH_INFO"]
        fn = apps.get(path) or (apps["/static/*"] if path.startswith("/static/") else None)
        if fn is None:
            start_response("404 Not Found", [])
            return [b""]
        return fn(environ, start_response)

    c = Client(app, Response)
    c.plugin = plugin
    return c


def _json(client, path, code=200, **query):
    r = client.get(path, query_string=query)
    assert r.status_code == code, r.data[:400]
    return json.loads(r.data)


def _png(client, path, **query) -> np.ndarray:
    from PIL import Image

    r = client.get(path, query_string=query)
    assert r.status_code == 200, r.data[:400]
    assert r.mimetype == "image/png"
    return np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB"))


def _value(x):
    """JSON numbers as the library writes them: non-finite ones as the words NaN, Inf, -Inf."""
    return float(x) if isinstance(x, str) and x.lower() in ("nan", "inf", "-inf") else x


def test_runs_are_listed_by_relative_path_and_the_plugin_is_active(client, logdir):
    body = _json(client, "/runs")
    assert [r["name"] for r in body["runs"]] == ["cnn-a", "group/cnn-b", "linear"]
    assert [r["snapshots"] for r in body["runs"]] == [
        len(load_run(logdir / r).snapshots) for r in ("cnn-a", "group/cnn-b", "linear")
    ]
    assert client.plugin.is_active()
    assert not WeightWatchPlugin(TBContext(logdir=str(logdir / "cnn-a" / "tensors"))).is_active()


def test_listing_hundreds_of_runs_reads_no_snapshot(tmp_path):
    for i in range(300):  # headers that are not even JSON: listing must not open them
        d = tmp_path / f"sweep/run{i:03d}"
        (d / "snapshots").mkdir(parents=True)
        (d / "weightwatch.json").write_text("not json")
        (d / "snapshots" / "initial.json").write_text("{")
    body = _json(_client(tmp_path), "/runs")
    assert len(body["runs"]) == 300 and not body["truncated"]
    assert {r["snapshots"] for r in body["runs"]} == {1}


@pytest.mark.parametrize("a,sa,b,sb", [
    ("cnn-a", "last", "group/cnn-b", "last"),
    ("cnn-a", "initial", "cnn-a", "1"),
    ("group/cnn-b", "0", "cnn-a", "initial"),
])
def test_compare_table_is_exactly_what_diff_runs_returns(client, logdir, a, sa, b, sb):
    body = _json(client, "/compare", a=a, sa=sa, b=b, sb=sb)
    step = lambda s: s if s in ("initial", "last") else int(s)  # noqa: E731
    expected = diff_runs(str(logdir / a), str(logdir / b), step_a=step(sa), step_b=step(sb))
    got = {t["name"]: t for t in body["tensors"]}
    assert set(got) == {t.name for t in expected.tensors}
    for t in expected.tensors:
        for field in ("status", "rel_l2", "cosine", "matched_cosine", "max_abs", "units_moved"):
            assert _value(got[t.name][field]) == getattr(t, field), (t.name, field)
    assert body["counts"] == expected.counts()
    assert body["conv"] == ["conv1/kernel", "conv2/kernel"]
    assert str(logdir) not in json.dumps(body)  # names, not the server's paths


def test_compare_is_cached_per_pair_of_snapshots(client):
    cache = client.plugin.diffs
    _json(client, "/compare", a="cnn-a", b="group/cnn-b")
    misses = cache.misses
    _json(client, "/compare", a="cnn-a", b="group/cnn-b", sa="last", sb="last")
    assert (cache.misses, cache.hits) == (misses, 1)


@pytest.mark.parametrize("key", ["conv1/kernel", "conv2/kernel"])
def test_kernel_route_draws_kernel_grid_at_every_step_including_initial(client, logdir, key):
    run = load_run(logdir / "cnn-a")
    steps = _json(client, "/run", run="cnn-a")["steps"]
    assert [s["name"] for s in steps] == ["initial", "0", "1", "2"]
    for s in steps:
        grid = kernel_grid(np.asarray(run.weights("initial" if s["name"] == "initial"
                                                  else s["step"])[key]))
        img = _png(client, "/kernel.png", run="cnn-a", key=key, step=s["name"])
        np.testing.assert_array_equal(img, grid.image)
        meta = _json(client, "/kernel", run="cnn-a", key=key, step=s["name"])
        assert meta["vmax"] == grid.vmax and meta["width"] == grid.image.shape[1]


def test_compare_kernels_are_b_reordered_by_the_matching_diff_runs_scores(client, logdir):
    a, b = load_run(logdir / "cnn-a"), load_run(logdir / "group/cnn-b")
    result = diff_runs(a, b)
    for key in ("conv1/kernel", "conv2/kernel"):
        q = dict(a="cnn-a", b="group/cnn-b", key=key)
        meta = _json(client, "/compare_kernel", which="b", **q)
        assert meta["matched"]
        assert meta["matched_cosine"] == pytest.approx(result.tensor(key).matched_cosine, rel=1e-9)
        ka = np.asarray(a.tensor(key), dtype=np.float64)
        img_a = _png(client, "/compare_kernel.png", which="a", **q)
        np.testing.assert_array_equal(img_a, kernel_grid(ka).image)
    # conv1 (4 units, nothing before it): the best of all 24 orders of B's units, by brute force
    key = "conv1/kernel"
    ka = np.asarray(a.tensor(key), dtype=np.float64).reshape(-1, 4)
    kb = np.asarray(b.tensor(key), dtype=np.float64).reshape(-1, 4)
    cos = (ka.T @ kb) / np.outer(np.linalg.norm(ka, axis=0), np.linalg.norm(kb, axis=0))
    best = max(itertools.permutations(range(4)), key=lambda p: sum(cos[i, p[i]] for i in range(4)))
    shape = a.tensor(key).shape
    kb_matched = kb[:, list(best)].reshape(shape)
    q = dict(a="cnn-a", b="group/cnn-b", key=key)
    np.testing.assert_array_equal(_png(client, "/compare_kernel.png", which="b", **q),
                                  kernel_grid(kb_matched).image)
    np.testing.assert_array_equal(_png(client, "/compare_kernel.png", which="diff", **q),
                                  kernel_grid(kb_matched - ka.reshape(shape)).image)


def test_heatmaps_equal_numpy_on_the_stored_weights(client, logdir):
    run = load_run(logdir / "cnn-a")
    w = [{k: np.asarray(v, np.float64) for k, v in run.weights(s.name if s.label == "initial"
          else s.step).items()} for s in run.snapshots]
    upd = _json(client, "/heatmap", run="cnn-a", metric="update")
    ini = _json(client, "/heatmap", run="cnn-a", metric="initial")
    assert upd["steps"] == ini["steps"] == ["initial", "0", "1", "2"] and ini["complete"]
    for r, key in enumerate(upd["keys"]):
        assert upd["values"][r][0] is None and ini["values"][r][0] == 0.0
        for c in range(1, len(w)):
            prev, cur, first = w[c - 1][key], w[c][key], w[0][key]
            if np.linalg.norm(prev):
                assert _value(upd["values"][r][c]) == pytest.approx(
                    np.linalg.norm(cur - prev) / np.linalg.norm(prev), rel=1e-6)
            if np.linalg.norm(first):
                assert _value(ini["values"][r][c]) == pytest.approx(
                    np.linalg.norm(cur - first) / np.linalg.norm(first), rel=1e-9)
    assert upd["nonfinite"] == [] == ini["nonfinite"]


def test_features_are_the_kernel_weights_over_steps_and_the_top_k_table(client, logdir):
    run = load_run(logdir / "linear")
    body = _json(client, "/features", run="linear")
    assert body["available"] and body["names"] == FEATURES and body["top_k"] == 3
    for t, s in enumerate(run.snapshots):
        kernel = np.asarray(run.weights("initial" if s.label == "initial" else s.step)
                            ["linear/kernel"])[:, 0]
        assert [body["weights"][i][t] for i in range(5)] == pytest.approx(kernel.tolist())
        order = np.argsort(-np.abs(kernel), kind="stable")[:3]
        assert [r["name"] for r in body["tables"][t]] == [FEATURES[i] for i in order]
    assert _json(client, "/features", run="cnn-a")["available"] is False


def test_tensor_route_gives_stored_stats_and_a_matrix_picture(client, logdir):
    run = load_run(logdir / "cnn-a")
    body = _json(client, "/tensor", run="cnn-a", key="out/kernel", step="1")
    assert body["shape"] == [96, 3] and body["stats"]["l2_norm"] == pytest.approx(
        float(np.linalg.norm(np.asarray(run.tensor("out/kernel", 1), np.float64))), rel=1e-9)
    img = _png(client, "/tensor.png", run="cnn-a", key="out/kernel", step="1")
    k = np.asarray(run.tensor("out/kernel", 1), np.float64)
    scale = img.shape[0] // 96
    assert img.shape == (96 * scale, 3 * scale, 3) and scale >= 1
    # a diverging scale: positive weights red, negative ones blue, pixel by pixel
    px = img[::scale, ::scale].astype(int)
    clear = np.abs(k) > 0.1 * np.abs(k).max()
    np.testing.assert_array_equal(np.sign(px[..., 0] - px[..., 2])[clear], np.sign(k)[clear])


@pytest.mark.parametrize("path,query", [
    ("/run", {"run": "../logs/cnn-a"}),
    ("/run", {"run": "/etc"}),
    ("/run", {"run": "cnn-a/../linear"}),
    ("/run", {"run": "group\\cnn-b"}),
    ("/run", {"run": "./cnn-a"}),
    ("/run", {"run": ""}),
    ("/run", {"run": "nothing-here"}),
    ("/run", {"run": "cnn-a\x00"}),
    ("/run", {"run": "x" * 5000}),
    ("/run", {"run": "cnn-a", "extra": "1"}),
    ("/run", {}),
    ("/kernel.png", {"run": "cnn-a", "key": "../../etc/passwd", "step": "0"}),
    ("/kernel.png", {"run": "cnn-a", "key": "out/kernel", "step": "0"}),
    ("/kernel.png", {"run": "cnn-a", "key": "conv1/kernel", "step": "1e3"}),
    ("/kernel.png", {"run": "cnn-a", "key": "conv1/kernel", "step": "99"}),
    ("/heatmap", {"run": "cnn-a", "metric": "rm -rf"}),
    ("/health", {}),
    ("/health", {"run": "../logs/cnn-a"}),
    ("/health", {"run": "nothing-here"}),
    ("/health", {"run": "cnn-a", "step": "1"}),
    ("/compare", {"a": "cnn-a", "b": "../cnn-a"}),
    ("/compare_kernel", {"a": "cnn-a", "key": "conv1/kernel", "which": "c"}),
])
def test_bad_parameters_are_refused_with_400(client, path, query):
    r = client.get(path, query_string=query)
    assert r.status_code == 400, (path, query, r.data)
    assert "Received:" in json.loads(r.data)["error"]


def test_repeated_parameter_and_oversized_query_are_refused(client):
    assert client.get("/run?run=cnn-a&run=linear").status_code == 400
    assert client.get("/runs?" + "a=1&" * 2000).status_code == 400


def test_symbolic_links_out_of_the_log_directory_are_refused(tmp_path, logdir):
    outside = tmp_path / "outside"
    shutil.copytree(logdir / "linear", outside)
    root = tmp_path / "logs"
    shutil.copytree(logdir / "cnn-a", root / "cnn-a")
    os.symlink(outside, root / "escape")
    c = _client(root)
    assert [r["name"] for r in _json(c, "/runs")["runs"]] == ["cnn-a"]
    assert c.get("/run", query_string={"run": "escape"}).status_code == 400
    assert c.get("/static/../plugin.py").status_code == 404
    assert c.get("/static/index.js").status_code == 200


def test_a_damaged_run_shows_its_error_and_the_others_still_work(tmp_path, logdir):
    root = tmp_path / "logs"
    for name in ("cnn-a", "linear"):
        shutil.copytree(logdir / name, root / name)
    shutil.copytree(logdir / "cnn-a", root / "broken")
    (root / "broken" / "snapshots" / "epoch_000001.json").write_text("{ not json")
    shutil.copytree(logdir / "cnn-a", root / "lost-tensors")
    for f in (root / "lost-tensors" / "tensors").iterdir():
        f.write_bytes(b"damaged")
    before = _tree(root)
    c = _client(root)
    assert [r["name"] for r in _json(c, "/runs")["runs"]] == [
        "broken", "cnn-a", "linear", "lost-tensors"]
    err = _json(c, "/run", 422, run="broken")["error"]
    assert "epoch_000001.json" in err and str(root) not in err
    assert _json(c, "/health", 422, run="broken")["error"] == err
    assert _json(c, "/compare", 422, a="lost-tensors", sa="initial")["error"]
    assert _json(c, "/run", run="cnn-a")["name"] == "cnn-a"
    assert _json(c, "/compare", a="cnn-a", sa="initial")["counts"]["changed"] > 0
    assert _tree(root) == before  # nothing was written, moved or deleted


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


def test_a_run_being_written_shows_complete_snapshots_and_new_ones_on_refresh(tmp_path, logdir):
    root = tmp_path / "logs"
    shutil.copytree(logdir / "cnn-a", root / "live")
    c = _client(root)
    assert [s["name"] for s in _json(c, "/run", run="live")["steps"]] == ["initial", "0", "1", "2"]
    # a snapshot file still being written (temporary name) is not shown
    (root / "live" / "snapshots" / ".tmp-epoch_000003.json").write_text('{"step": 3')
    assert [s["name"] for s in _json(c, "/run", run="live")["steps"]] == ["initial", "0", "1", "2"]
    model = _cnn(1)
    model.set_weights([np.asarray(w) for w in load_run(root / "live").weights().values()])
    _fit(model, root / "live", epochs=1)  # a later fit continues the run
    steps = [s["name"] for s in _json(c, "/run", run="live")["steps"]]
    assert steps == [s.name for s in load_run(root / "live").snapshots] and len(steps) > 4


def test_change_since_initial_reads_a_bounded_amount_per_request(client, monkeypatch):
    from keras_weightwatch.tensorboard_plugin import content

    full = _json(client, "/heatmap", run="group/cnn-b", metric="initial")
    monkeypatch.setattr(content, "HEATMAP_BUDGET_BYTES", 1)  # one snapshot per request
    fresh = _client(client.plugin.library.logdir)
    answers = [_json(fresh, "/heatmap", run="group/cnn-b", metric="initial") for _ in range(4)]
    filled = [sum(v is not None for v in a["values"][0]) for a in answers]
    assert filled == [1, 2, 3, 4] and [a["complete"] for a in answers] == [False] * 3 + [True]
    assert answers[-1]["values"] == full["values"]


def test_a_log_directory_that_is_itself_a_run_is_named_dot(logdir):
    c = _client(logdir / "cnn-a")
    assert [r["name"] for r in _json(c, "/runs")["runs"]] == ["."]
    assert [s["name"] for s in _json(c, "/run", run=".")["steps"]] == ["initial", "0", "1", "2"]


def test_heatmap_marks_every_tensor_that_holds_nan_or_inf(tmp_path):
    model = _cnn(3)
    weights = model.get_weights()
    weights[-2][0, 0] = np.nan  # out/kernel: NaN spreads through training from here
    model.set_weights(weights)
    with pytest.warns(WeightWatchWarning, match="non_finite"):
        _fit(model, tmp_path / "nan", epochs=2)
    run = load_run(tmp_path / "nan")
    c = _client(tmp_path)
    body = _json(c, "/heatmap", run="nan")
    expected = sorted(
        [r, c] for r, key in enumerate(body["keys"]) for c, s in enumerate(run.snapshots)
        if not np.isfinite(np.asarray(run.weights(s.name if s.label == "initial" else s.step)
                                      [key])).all())
    assert body["nonfinite"] == expected and [body["keys"].index("out/kernel"), 0] in expected
    health = _json(c, "/health", run="nan")  # the one finding of a run gone non-finite
    assert health["errors"] == 1 and [(f["rule"], f["severity"], f["key"], f["column"])
                                      for f in health["findings"]] == [
        ("non_finite", "error", "out/kernel", "initial")]


def _reference_responses(images, kernel):
    """Valid, stride-1 responses by scipy: correlate2d of each channel, summed."""
    from scipy.signal import correlate2d

    out = []
    for img in np.asarray(images, np.float64):
        maps = [sum(correlate2d(img[..., c], kernel[..., c, o], mode="valid")
                    for c in range(kernel.shape[2])) for o in range(kernel.shape[3])]
        out.append(np.stack(maps, axis=-1))
    return np.stack(out)


def _event_images(run_dir, tag):
    """step -> the PNG bytes the responses view wrote (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(os.path.join(run_dir, "weights"), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return {e.step: tensor_util.make_ndarray(e.tensor_proto)[2] for e in acc.Tensors(tag)}


def test_responses_at_every_step_are_the_stored_images_filtered_by_that_steps_kernel(
        client, logdir):
    from helpers import run_group
    from PIL import Image

    from keras_weightwatch.images import response_grid
    from keras_weightwatch.responses import Geometry
    from keras_weightwatch.summaries import response_tag

    run = load_run(logdir / "cnn-a")
    np.testing.assert_array_equal(run.sample_images(), SAMPLES)
    written = _event_images(str(logdir / "cnn-a"), response_tag(run_group(run), "conv1", 1))
    (layer,) = run.samples.responses
    for s in run.snapshots:
        body = _json(client, "/responses", run="cnn-a", key="conv1/kernel", step=s.name)
        assert body["available"] and body["shown"] == body["stored"] == body["total"] == 3
        kernel = np.asarray(run.weights("initial" if s.label == "initial" else s.step)
                            ["conv1/kernel"], np.float64)
        expected = _reference_responses(SAMPLES, kernel)
        for i in range(3):
            geometry = Geometry(kernel.shape[:2], layer.strides, layer.padding, layer.dilation)
            grid = response_grid(SAMPLES[i], expected[i], geometry=geometry)
            img = _png(client, "/responses.png", run="cnn-a", key="conv1/kernel", step=s.name,
                       sample=str(i))
            np.testing.assert_allclose(img, grid.image, atol=1)  # float rounding at a colour edge
            assert body["samples"][i]["scales"] == pytest.approx(grid.scales, rel=1e-9)
            assert body["samples"][i]["means"] == pytest.approx(grid.means, rel=1e-9, abs=1e-12)
        # what the TensorBoard view drew at that step, pixel for pixel
        view = np.asarray(Image.open(io.BytesIO(written[s.step])).convert("RGB"))
        np.testing.assert_array_equal(
            _png(client, "/responses.png", run="cnn-a", key="conv1/kernel", step=s.name,
                 sample="1"), view)


def test_responses_say_why_when_the_run_cannot_have_them(client):
    conv2 = _json(client, "/responses", run="cnn-a", key="conv2/kernel", step="last")
    assert not conv2["available"] and "conv1/kernel" in conv2["reason"]
    none = _json(client, "/responses", run="group/cnn-b", key="conv1/kernel", step="last")
    assert not none["available"] and "sample_images" in none["reason"]
    r = client.get("/responses.png", query_string=dict(run="cnn-a", key="conv1/kernel",
                                                        step="last", sample="3"))
    assert r.status_code == 400 and b"sample=3" in r.data


def test_features_mark_the_partners_the_stored_feature_data_correlates(client, logdir):
    body = _json(client, "/features", run="linear")
    r = np.corrcoef(_feature_data(), rowvar=False)
    np.fill_diagonal(r, 0.0)
    expected = {FEATURES[i]: [FEATURES[int(np.argmax(np.abs(r[i])))], np.max(np.abs(r[i]))]
                for i in range(5) if np.max(np.abs(r[i])) >= 0.9}
    assert set(body["partners"]) == set(expected) == {"weight", "height"}
    for name, (partner, corr) in expected.items():
        assert body["partners"][name][0] == partner
        assert abs(body["partners"][name][1]) == pytest.approx(corr, rel=1e-9)
    assert body["partners_from"] == {"rows": 64, "rows_total": 64, "threshold": 0.9}
    for table in body["tables"]:
        for row in table:
            assert row["partner"] == (expected[row["name"]][0] if row["name"] in expected
                                      else None)


# ------------------------------------------------------------------ health


def _detached(seed: int = 4):
    """A Dense layer behind stop_gradient: it gets no gradient, so it never moves."""
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu", name="detached")(inputs)
    h = keras.layers.Lambda(keras.ops.stop_gradient, name="stop")(h)
    h = keras.layers.Dense(8, activation="relu", name="hidden")(h)
    return keras.Model(inputs, keras.layers.Dense(2, name="out")(h))


def _fit_detached(run_dir, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Gradients do not exist")  # planted: stop_gradient
        _fit(_detached(), run_dir, epochs=3, **kwargs)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """`detached`, written with the live health rules (the per-unit numbers stored), and
    `old`, the same training written without them (as runs before the rules were)."""
    root = tmp_path_factory.mktemp("health")
    with pytest.warns(WeightWatchWarning, match="not_learning in layer 'detached'"):
        _fit_detached(root / "detached")
    _fit_detached(root / "old", health=None)
    return root


def test_health_route_gives_diagnose_findings_at_their_heatmap_cells(planted):
    c = _client(planted)
    run = load_run(planted / "detached")
    expected = diagnose(run)
    body = _json(c, "/health", run="detached")
    assert [f.rule for f in expected.findings] == ["not_learning"]  # what was planted
    assert body["run"] == "detached" and str(planted) not in json.dumps(body)
    assert (body["healthy"], body["errors"], body["warnings"], body["snapshots"]) == (
        False, 0, 1, len(run.snapshots))
    assert body["notes"] == expected.notes and "gradient_data" in body["notes"][0]
    names = {s.step: s.name for s in run.snapshots}
    for got, f in zip(body["findings"], expected.findings, strict=True):
        assert {k: got[k] for k in f.to_json()} == f.to_json()
        assert (got["step_name"], got["since_name"], got["last_name"]) == (
            names[f.step], names[f.since], names[f.last])
    f = body["findings"][0]
    assert (f["layer"], f["key"], f["since_name"], f["last_name"]) == (
        "detached", "detached/kernel", "0", "2")
    heat = _json(c, "/heatmap", run="detached")  # the mark's cell: its weight, its step
    assert f["key"] in heat["keys"] and f["column"] == f["step_name"] in heat["steps"]
    ratios = heat["values"][heat["keys"].index(f["key"])]
    assert ratios[heat["steps"].index(f["since_name"]):] == [0.0] * 3  # it never moved


def test_a_healthy_run_has_no_finding(client, logdir):
    assert diagnose(load_run(logdir / "cnn-a")).findings == []
    body = _json(client, "/health", run="cnn-a")
    assert body["healthy"] is True and body["findings"] == [] and body["errors"] == 0


def test_health_is_cached_per_run_and_follows_a_run_that_changes(tmp_path, planted):
    root = tmp_path / "logs"
    shutil.copytree(planted / "detached", root / "live")
    later = tmp_path / "later"
    later.mkdir()
    for name in ("epoch_000001.json", "epoch_000002.json"):  # as if only 1 epoch was written
        shutil.move(root / "live" / "snapshots" / name, later / name)
    c = _client(root)
    assert _json(c, "/health", run="live")["healthy"] is True  # too soon to tell
    hits = c.plugin.findings.hits
    assert _json(c, "/health", run="live")["healthy"] is True
    assert c.plugin.findings.hits == hits + 1  # the same run: not judged again
    for name in ("epoch_000001.json", "epoch_000002.json"):  # the next epochs arrive
        shutil.copy(later / name, root / "live" / "snapshots" / name)
    body = _json(c, "/health", run="live")
    assert [(f["rule"], f["layer"]) for f in body["findings"]] == [("not_learning", "detached")]
    assert c.plugin.findings.hits == hits + 1


def test_health_reads_a_bounded_amount_of_an_old_runs_tensors(planted, monkeypatch):
    from keras_weightwatch.run.reader import Run
    from keras_weightwatch.tensorboard_plugin import content

    reads = []
    weights = Run.weights
    monkeypatch.setattr(Run, "weights", lambda self, *a, **k: reads.append(k.get("keys"))
                        or weights(self, *a, **k))
    full = _json(_client(planted), "/health", run="old")
    assert reads and all(keys for keys in reads)  # per-unit numbers computed from the tensors
    reads.clear()
    _json(_client(planted), "/health", run="detached")
    assert reads == []  # stored with the statistics: nothing to read
    monkeypatch.setattr(content, "HEALTH_BUDGET_BYTES", 0)
    cut = _json(_client(planted), "/health", run="old")
    assert reads == []
    assert cut["findings"] == full["findings"]  # not_learning reads the statistics alone
    assert cut["notes"][:-1] == full["notes"] and "weightwatch doctor" in cut["notes"][-1]
