"""End to end: the WeightWatch tab in a real `tensorboard` server, driven by headless Chromium.

TensorBoard must find the plugin through the package's `tensorboard_plugins` entry
point (an installed package), list it in `/data/plugins_listing`, and the tab must
show `diff_runs`' numbers for two runs and every stored kernel step.
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
from keras_weightwatch.images import kernel_grid

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "docs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


dash = _module("make_dashboard_screenshots")
ENTRY = [e for e in importlib.metadata.entry_points(group="tensorboard_plugins")
         if e.name == "weightwatch"]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not ENTRY, reason="the package is not installed (no tensorboard_plugins entry point)")]


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dash") / "demo"
    out, err = io.StringIO(), io.StringIO()
    assert main(["demo", "--quick", "--logdir", str(d)], stdout=out, stderr=err) == 0, err
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
                    "conv1/kernel")
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
    for name in ("glance", "compare", "kernels", "features"):
        assert (tmp_path / f"dashboard_{name}.png").stat().st_size > 10_000
