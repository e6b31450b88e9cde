"""End to end: the WeightWatch tab in a real `tensorboard` server, driven by headless Chromium.

TensorBoard must find the plugin through the package's `tensorboard_plugins` entry
point (an installed package), list it in `/data/plugins_listing`, and the tab must
show `diff_runs`' numbers for two runs, every stored kernel step with the sample images'
responses at that step, the correlated partners of the stored feature data, and a run's
health findings (`health.diagnose`'s) listed on top and marked on the heatmap.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

from keras_weightwatch import diff_runs, load_run
from keras_weightwatch.cli import main
from keras_weightwatch.features import FeatureData
from keras_weightwatch.health import diagnose
from keras_weightwatch.images import kernel_grid, response_grid
from keras_weightwatch.responses import correlate

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "docs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


dash = _module("make_dashboard_screenshots")
health_shots = _module("make_health_screenshots")
ENTRY = [e for e in importlib.metadata.entry_points(group="tensorboard_plugins")
         if e.name == "weightwatch"]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not ENTRY, reason="the package is not installed (no tensorboard_plugins entry point)")]


CORRELATED = ["a", "b", "c", "twin_of_c"]


def _correlated_run(run_dir: str) -> None:
    """A linear model whose feature data holds a pair correlated at r > 0.9 (c, twin_of_c)."""
    import keras

    from keras_weightwatch import WeightWatch

    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 4)).astype("float32")
    x[:, 3] = x[:, 2] + 0.05 * x[:, 3]
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="linear")])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, x @ np.array([1.0, -2.0, 3.0, 0.5]), epochs=2, verbose=0, callbacks=[
        WeightWatch(run_dir, feature_names=CORRELATED, feature_data=x, top_k=4)])


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dash") / "demo"
    out, err = io.StringIO(), io.StringIO()
    assert main(["demo", "--quick", "--logdir", str(d)], stdout=out, stderr=err) == 0, err
    _correlated_run(str(d / "correlated"))
    warned = health_shots.planted_run(str(d / health_shots.RUN))
    assert {rule for rule in health_shots.PLANTED if any(rule in w for w in warned)} == set(
        health_shots.PLANTED), warned  # the fit warned of each planted finding, live
    return str(d)


@pytest.fixture(scope="module")
def server(logdir):
    with dash.shots.serve(logdir) as url:
        yield url


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_plugins_listing_shows_the_weightwatch_tab_active(server):
    code, body = _get(f"{server}/data/plugins_listing")
    listing = json.loads(body)["weightwatch"]
    assert code == 200 and listing["enabled"] is True and listing["tab_name"] == "WeightWatch"
    assert listing["loading_mechanism"] == {
        "type": "IFRAME", "module_path": "/data/plugin/weightwatch/static/index.js"}


@pytest.mark.parametrize("query", [
    "run?run=..%2Fdemo", "run?run=%2Fetc", "run?run=digits-seed1%2F..%2Fphotos",
    "kernel.png?run=digits-seed1&key=..%2F..%2Fweightwatch.json&step=0",
    "run?run=digits-seed1&run=photos", "heatmap?run=digits-seed1&metric=x" + "y" * 5000,
])
def test_the_real_server_refuses_unsafe_requests_with_400(server, query):
    code, body = _get(f"{server}/data/plugin/weightwatch/{query}")
    assert code == 400, body[:300]


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(dash.shots.CHROMIUM), reason="needs Debian's chromium")
def test_the_tab_shows_diff_runs_numbers_and_every_kernel_step(server, logdir, tmp_path):
    tab = dash.take(server, str(tmp_path), "digits-seed1", "digits-seed2", "digits-seed1",
                    "conv1/kernel", features_run="correlated")
    expected = diff_runs(os.path.join(logdir, "digits-seed1"), os.path.join(logdir, "digits-seed2"))
    assert set(tab.compare_rows) == {t.name for t in expected.tensors}
    for t in expected.tensors:
        row = tab.compare_rows[t.name]
        assert row["status"] == t.status
        for col in ("rel_l2", "cosine", "matched_cosine", "max_abs"):
            shown, value = row[col], getattr(t, col)
            if value is None:  # e.g. no matching applied (output units): shown as a dash
                assert shown == "\u2014", (t.name, col, shown)
                continue
            digits = len(shown.lstrip("-").replace(".", "").lstrip("0").split("e")[0])
            assert digits >= 4 or float(shown) == value, (t.name, col, shown)  # "0", "1" exact
            assert float(shown) == pytest.approx(value, rel=1e-5), (t.name, col)
    run = load_run(os.path.join(logdir, "digits-seed1"))
    assert tab.kernel_steps == [s.name for s in run.snapshots]
    assert tab.kernel_steps[0] == "initial" and len(tab.kernel_steps) == len(run.epochs) + 1
    from PIL import Image

    for s in run.snapshots:  # the image the page loaded at each step is that step's grid
        code, png = _get(urllib.parse.urljoin(f"{server}/data/plugin/weightwatch/",
                                              tab.kernel_images[s.name]))
        step = "initial" if s.label == "initial" else s.step
        grid = kernel_grid(np.asarray(run.weights(step)["conv1/kernel"]))
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")),
                                      grid.image)
    _assert_responses(server, run, tab.response_images)
    _assert_partners(logdir, tab)
    for name in ("glance", "compare", "kernels", "features"):
        assert (tmp_path / f"dashboard_{name}.png").stat().st_size > 10_000


def _png(server, src):
    from PIL import Image

    code, png = _get(urllib.parse.urljoin(f"{server}/data/plugin/weightwatch/", src))
    assert code == 200, png[:300]
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _assert_responses(server, run, shown):
    """At every step the page showed each sample image's responses to that step's kernel."""
    images = run.sample_images()
    assert images is not None and list(images.shape) == run.settings["sample_images"]
    assert set(shown) == {s.name for s in run.snapshots}
    layer = next(r for r in run.samples.responses if r.key == "conv1/kernel")
    for s in run.snapshots:
        kernel = run.weights("initial" if s.label == "initial" else s.step)["conv1/kernel"]
        res = correlate(images, kernel, layer.strides, layer.padding, layer.dilation)
        assert len(shown[s.name]) == len(images)
        for i, src in enumerate(shown[s.name]):
            assert f"sample={i}" in src and f"step={s.name}" in src
            np.testing.assert_array_equal(_png(server, src), response_grid(images[i], res[i]).image)


def _assert_partners(logdir, tab):
    """The features table and chart mark the pair the stored feature data correlates."""
    run = load_run(os.path.join(logdir, "correlated"))
    described = FeatureData.from_sample(run.feature_data())
    expected = {CORRELATED[i]: (CORRELATED[p[0]], p[1])
                for i, p in enumerate(described.partners) if p is not None}
    assert set(expected) == {"c", "twin_of_c"}  # the data's own pair, found by the library
    assert set(tab.partners) == set(expected)  # top_k=4: every feature is in the table
    for name, (partner, r) in expected.items():
        shown_partner, shown_r = tab.partners[name].rsplit(" (", 1)
        assert shown_partner == partner and float(shown_r.rstrip(")")) == pytest.approx(r, rel=1e-5)
    assert sorted(tab.partner_marks) == sorted(f"\u2194 {p}" for p, _ in expected.values())


ORANGE, RED = (0xEF, 0x6C, 0x00), (0xD5, 0x00, 0x00)  # style.css: warning, error


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(dash.shots.CHROMIUM), reason="needs Debian's chromium")
def test_the_tab_lists_a_runs_findings_and_marks_them_on_the_heatmap(server, logdir, tmp_path):
    from PIL import Image

    shown = health_shots.take(server, str(tmp_path))
    run = load_run(os.path.join(logdir, health_shots.RUN))
    names = {s.step: s.name for s in run.snapshots}
    expected = diagnose(run).findings
    assert {(f.rule, f.layer) for f in expected} == set(health_shots.PLANTED.items())
    assert [(r["severity"], r["rule"], r["layer"], r["since"], r["message"], r["hint"])
            for r in shown.rows] == [(f.severity, f.rule, f.layer, names[f.since], f.message,
                                      f.hint) for f in expected]
    assert "spectral_freq" in shown.notes  # the run has no spectral metrics: said, not hidden
    assert sorted((m["rule"], m["key"], m["step"]) for m in shown.marks) == sorted(
        (f.rule, f.key, names[f.step]) for f in expected)
    picture = np.asarray(Image.open(tmp_path / "health_tab.png").convert("RGB")).astype(int)
    messages = {f.rule: f.message for f in expected}
    for m in shown.marks:
        assert m["visible"] and m["title"].startswith(f"{m['rule']} (warning) in "), m
        assert m["tooltip"].startswith(f"{m['key']} @ {m['step']}: "), m  # the cell's tooltip
        assert f"\n{m['rule']} (warning): {messages[m['rule']]}" in m["tooltip"], m
        box = m["box"]  # the ring is drawn in the warning's colour where the page puts it
        x0, y0 = int(box["x"]), int(box["y"])
        ring = picture[y0:y0 + int(box["height"]) + 1, x0:x0 + int(box["width"]) + 1]
        assert (np.abs(ring - ORANGE).sum(axis=-1) < 40).sum() >= 20, m
    assert not (np.abs(picture - RED).sum(axis=-1) < 40).any()  # no error, no red


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(dash.shots.CHROMIUM), reason="needs Debian's chromium")
def test_a_healthy_run_says_no_finding(server, logdir):
    from playwright.sync_api import sync_playwright

    assert diagnose(os.path.join(logdir, "correlated")).findings == []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=dash.shots.CHROMIUM,
                                    args=dash.shots.CHROMIUM_ARGS)
        try:
            _, frame, _ = dash.open_tab(browser, server)
            frame.locator("#ww-glance-run").select_option("correlated")
            none = frame.locator("#ww-health-none")
            none.wait_for(timeout=60_000)
            assert none.inner_text().startswith("No finding")
            assert frame.locator(".ww-mark").count() == 0
            assert frame.locator("#ww-findings").count() == 0
        finally:
            browser.close()
