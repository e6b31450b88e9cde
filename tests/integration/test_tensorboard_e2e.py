"""End to end: a real `tensorboard` server on the demo's log directory, and headless Chromium.

The server's HTTP data API must return exactly what the run directories hold (checked
against numpy on `load_run`'s arrays), and the dashboards a person opens must show our
table, images and charts (asserted on the rendered pages, whose content lives in shadow
DOM). The same functions make the README's screenshots (docs/make_screenshots.py).
"""

from __future__ import annotations

import base64
import html
import importlib.util
import io
import json
import os
import re
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest
from helpers import run_group, run_kernel_tags

from keras_weightwatch import load_run
from keras_weightwatch.cli import main
from keras_weightwatch.demo import DIABETES_RATIO, DIGITS_SALIENCY, PHOTOS_FIRST_CONV, RUN_NAMES
from keras_weightwatch.features import top_k_features
from keras_weightwatch.images import kernel_grid
from keras_weightwatch.stats import STAT_NAMES
from keras_weightwatch.summaries import (
    IMAGE_SECTIONS,
    KERNELS,
    RESPONSES,
    SALIENCY,
    response_tag,
    saliency_tag,
    tag,
)
from keras_weightwatch.views.gradients import GRAD_STAT_NAMES
from keras_weightwatch.views.stats import NONFINITE_STATS

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _screenshots_module():
    path = os.path.join(ROOT, "docs", "make_screenshots.py")
    spec = importlib.util.spec_from_file_location("make_screenshots", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_screenshots"] = module
    spec.loader.exec_module(module)
    return module


shots = _screenshots_module()


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e") / "demo"
    out, err = io.StringIO(), io.StringIO()
    assert main(["demo", "--quick", "--logdir", str(d)], stdout=out, stderr=err) == 0, err
    return str(d)


@pytest.fixture(scope="module")
def server(logdir):
    with shots.serve(logdir) as url:
        yield url


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read()


def _json(server: str, path: str, **query) -> object:
    return json.loads(_get(f"{server}{path}?{urllib.parse.urlencode(query)}"))


def _diabetes_names() -> list[str]:
    """The diabetes run's feature names: scikit-learn's ten and the demo's derived ratio."""
    from sklearn.datasets import load_diabetes

    return list(load_diabetes().feature_names) + [DIABETES_RATIO]


def _decode_png(data: bytes) -> np.ndarray:
    import tensorflow as tf

    return tf.io.decode_png(data).numpy()


def test_server_lists_every_run_and_exactly_our_scalar_tags(server, logdir):
    runs = set(_json(server, "/data/runs"))
    assert runs == {f"{r}/{sub}" for r in RUN_NAMES for sub in ("train", "validation", "weights")}
    tags = _json(server, "/data/plugin/scalars/tags")
    run = load_run(os.path.join(logdir, "digits-seed1"))
    # every weight's statistics, and the demo's digits runs also record gradient norms
    # of every trainable weight
    trainable = [s.key for s in run.specs if s.trainable]
    assert trainable
    # nan_count and inf_count only for a weight that has had a NaN or an Inf: none here
    assert not any(st["nan_count"] or st["inf_count"]
                   for step in run.steps for st in run.snapshot(step).stats.values())
    assert set(tags["digits-seed1/weights"]) == {
        tag(s.key, stat) for s in run.specs for stat in STAT_NAMES
        if stat not in NONFINITE_STATS
    } | {tag(k, stat) for k in trainable for stat in GRAD_STAT_NAMES} | {
        "health/errors", "health/warnings"}  # the health rules' counts of open findings
    # the top-k feature scalars: one per diabetes feature, named after it
    names = _diabetes_names()
    feature_tags = {t for t in tags["diabetes/weights"] if t.startswith("features/")}
    assert feature_tags == {f"features/linear/{n}" for n in names}


def test_scalars_are_the_norms_of_the_stored_weights(server, logdir):
    run = load_run(os.path.join(logdir, "digits-seed1"))
    points = _json(server, "/data/plugin/scalars/scalars",
                   run="digits-seed1/weights", tag="conv1/kernel/l2_norm")
    assert [step for _, step, _ in points] == run.steps
    for _, step, value in points:
        kernel = np.asarray(run.weights(step)["conv1/kernel"], dtype=np.float64)
        assert value == pytest.approx(np.linalg.norm(kernel), rel=1e-6)


def test_text_table_ranks_the_features_of_every_step(server, logdir):
    names = _diabetes_names()
    run = load_run(os.path.join(logdir, "diabetes"))
    entries = _json(server, "/data/plugin/text/text", run="diabetes/weights", tag="features/linear")
    assert [e["step"] for e in entries] == run.steps
    for e in entries:
        kernel = np.asarray(run.weights(e["step"])["linear/kernel"])[:, 0]
        order = np.argsort(-np.abs(kernel), kind="stable")[:5]
        cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", e["text"])]
        rows = [cells[i : i + 5] for i in range(0, len(cells), 5)]
        assert [r[1] for r in rows] == [names[i] for i in order]
        assert [float(r[2]) for r in rows] == pytest.approx(kernel[order].tolist(), rel=1e-3)


def test_each_models_images_are_one_group_headline_views_first(server, logdir):
    """TensorBoard groups image tags by their first component (opening the first two groups)
    and sorts a group's cards by tag: one group per model, filtered images first."""
    served = _json(server, "/data/plugin/images/tags")
    groups: dict[str, set[str]] = {}
    for name in RUN_NAMES:
        run = load_run(os.path.join(logdir, name))
        tags = set(served.get(f"{name}/weights", {}))
        assert {t.split("/")[0] for t in tags} <= {run_group(run)}
        if tags:  # (the diabetes model has no images)
            groups.setdefault(run_group(run), set()).update(tags)
    digits = run_group(load_run(os.path.join(logdir, "digits-seed1")))
    assert digits == run_group(load_run(os.path.join(logdir, "digits-seed2")))
    assert len(groups) == 2 and digits != run_group(load_run(os.path.join(logdir, "photos")))
    for tags in groups.values():
        sections = [t.split("/")[1] for t in sorted(tags)]
        assert sections == sorted(sections) and sections[0] == RESPONSES
        assert set(sections) <= set(IMAGE_SECTIONS)


def test_images_are_the_kernel_grids_of_the_stored_weights(server, logdir):
    for name, key in (("digits-seed1", "conv1/kernel"), ("photos", f"{PHOTOS_FIRST_CONV}/kernel")):
        run = load_run(os.path.join(logdir, name))
        entries = _json(server, "/data/plugin/images/images",
                        run=f"{name}/weights", tag=run_kernel_tags(run)[key])
        assert [e["step"] for e in entries] == run.steps
        for e in entries:
            png = _get(f"{server}/data/plugin/images/individualImage?{e['query']}")
            expected = kernel_grid(np.asarray(run.weights(e["step"])[key]))
            np.testing.assert_array_equal(_decode_png(png), expected.image)
        assert expected.rgb == (name == "photos")  # 3-channel first layer: colour tiles


def test_histogram_counts_equal_numpy_on_the_stored_weights(server, logdir):
    run = load_run(os.path.join(logdir, "digits-seed2"))
    data = _json(server, "/data/plugin/histograms/histograms",
                 run="digits-seed2/weights", tag="conv2/kernel/histogram")
    assert [step for _, step, _ in data] == run.steps
    for _, step, buckets in data:
        kernel = np.asarray(run.weights(step)["conv2/kernel"]).ravel()
        b = np.asarray(buckets)
        edges = np.append(b[:, 0], b[-1, 1])
        assert b[:, 2].sum() == kernel.size
        np.testing.assert_array_equal(b[:, 2], np.histogram(kernel, bins=edges)[0])


def _png_size(path: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(shots.CHROMIUM), reason="needs Debian's chromium")
def test_dashboards_show_our_table_images_and_charts(server, logdir, tmp_path):
    pages = shots.take(server, str(tmp_path))
    for s in shots.SHOTS:
        assert _png_size(str(tmp_path / f"{s.name}.png")) == (s.width, s.height)

    # the text dashboard shows the last step's table first, rows in rank order
    names = _diabetes_names()
    run = load_run(os.path.join(logdir, "diabetes"))
    kernel = np.asarray(run.weights()["linear/kernel"])[:, 0]
    top = [f.name for f in top_k_features(kernel[:, None], names, 5)]
    lines = pages["features"].text.splitlines()
    first = lines.index("rank")
    shown = [lines[i + 1] for i in range(first, len(lines) - 1) if lines[i] in "12345"][:5]
    assert shown == top
    assert f"epoch {run.epochs[-1]}, step {run.steps[-1]}" in pages["features"].text

    # the images dashboard shows every kernel grid, decoded at the grid's own width
    def served(page):
        """(run, tag, decoded width) of each image the page shows from the server."""
        out = set()
        for img in page.images:
            query = urllib.parse.parse_qs(urllib.parse.urlparse(img["src"]).query)
            if "blob_key" in query:
                key = json.loads(base64.urlsafe_b64decode(query["blob_key"][0] + "=="))
                out.add((key[1], key[2], img["width"]))
        return out

    widths = {}
    for name in RUN_NAMES:
        r = load_run(os.path.join(logdir, name))
        for key, image_tag in run_kernel_tags(r).items():
            widths[(f"{name}/weights", image_tag)] = kernel_grid(
                np.asarray(r.weights()[key])).image.shape[1]
    # (the filtered section and the open model groups below it, which also hold the other
    # views, may show a grid twice): the digits runs' grids on the kernels page, the photos
    # run's first-layer grid on the RGB kernels page
    def grids(page, runs):
        return {((run, t), w) for run, t, w in served(page) if f"/{KERNELS}/" in t and run in runs}

    digits_runs = {"digits-seed1/weights", "digits-seed2/weights"}
    assert grids(pages["kernels"], digits_runs) == {
        (k, w) for k, w in widths.items() if k[0] in digits_runs}
    rgb = ("photos/weights",
           run_kernel_tags(load_run(os.path.join(logdir, "photos")))[f"{PHOTOS_FIRST_CONV}/kernel"])
    assert (rgb, widths[rgb]) in grids(pages["rgb_kernels"], {"photos/weights"})

    # each photograph's responses whole in the first screen, drawn at the image's own width
    photo_responses = [t for t in _json(server, "/data/plugin/images/tags")["photos/weights"]
                       if f"/{RESPONSES}/" in t]
    assert photo_responses
    seen = _on_screen(pages["rgb_responses"])
    for t in photo_responses:
        drawn = seen[("photos/weights", t)]
        assert any(round(im["right"] - im["left"]) == im["width"] for im in drawn), drawn

    # responses of samples 0 and 1 for both digits runs, each loaded in the page (the open
    # model groups below the filtered section load the other samples' too)
    group = run_group(load_run(os.path.join(logdir, "digits-seed1")))
    responses = {(run, t) for run, t, w in served(pages["responses"])
                 if f"/{RESPONSES}/" in t and w > 0}
    assert responses >= {(f"digits-seed{s}/weights", response_tag(group, "conv1", i))
                         for s in (1, 2) for i in (0, 1)}

    for stat in set(STAT_NAMES) - set(NONFINITE_STATS):
        assert f"conv1/kernel/{stat}" in pages["statistics"].text
    assert pages["histograms"].text.count("conv1/kernel/histogram") >= 2

    # saliency maps of samples 0 and 1 by each of the demo's methods, for both digits runs
    saliency = {(run, t) for run, t, w in served(pages["saliency"])
                if f"/{SALIENCY}/" in t and w > 0}
    assert saliency >= {(f"digits-seed{s}/weights", saliency_tag(group, m, i))
                        for s in (1, 2) for m in DIGITS_SALIENCY for i in (0, 1)}
    # a gradient-norm chart and a gradient-to-weight chart of every trainable kernel
    kernels = [s.key for s in load_run(os.path.join(logdir, "digits-seed1")).specs
               if s.trainable and s.key.endswith("/kernel")]
    for key in kernels:
        for stat in ("grad_norm", "grad_to_weight"):
            assert f"{key}/{stat}" in pages["gradients"].text



def _image_tags_by_content(server: str, logdir: str, name: str) -> tuple[dict, set]:
    """A run's image tags, told apart by what they hold, not by their names: {kernel key:
    tag of its grid} (the tag whose last image is `kernel_grid` of that stored kernel), and
    the other image tags (the filtered images, for a run without saliency maps)."""
    run = load_run(os.path.join(logdir, name))
    last = run.weights()
    grids = {s.key: kernel_grid(np.asarray(last[s.key])).image for s in run.specs
             if s.key.endswith("/kernel") and len(s.shape) == 4}
    kernel_tags, others = {}, set()
    for t in _json(server, "/data/plugin/images/tags")[f"{name}/weights"]:
        entries = _json(server, "/data/plugin/images/images", run=f"{name}/weights", tag=t)
        png = _decode_png(_get(f"{server}/data/plugin/images/individualImage?"
                               f"{entries[-1]['query']}"))
        hits = [k for k, g in grids.items() if g.shape == png.shape and np.array_equal(g, png)]
        if hits:
            kernel_tags[hits[0]] = t
        else:
            others.add(t)
    assert sorted(kernel_tags) == sorted(grids)
    return kernel_tags, others


def _on_screen(page) -> dict:
    """(run, tag) -> the rectangles of its loaded images that lie in the first screen:
    inside the viewport, without scrolling."""
    width, height = page.viewport
    out: dict = {}
    for img in page.images:
        query = urllib.parse.parse_qs(urllib.parse.urlparse(img["src"]).query)
        if "blob_key" not in query or img["width"] <= 0:
            continue
        key = json.loads(base64.urlsafe_b64decode(query["blob_key"][0] + "=="))
        if img["top"] >= 0 and img["bottom"] <= height and img["bottom"] > img["top"] \
                and 0 <= img["left"] and img["right"] <= width:
            out.setdefault((key[1], key[2]), []).append(img)
    return out


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(shots.CHROMIUM), reason="needs Debian's chromium")
def test_images_tab_first_screen_shows_the_rgb_kernels_and_filtered_images(server, logdir,
                                                                           tmp_path):
    """A newcomer opens the Images tab (no tag filter, no clicks): the photos run's RGB
    first-layer kernels and its filtered photographs are in the first screen."""
    kernel_tags, response_tags = _image_tags_by_content(server, logdir, "photos")
    rgb = kernel_tags[f"{PHOTOS_FIRST_CONV}/kernel"]
    assert response_tags, "the photos run wrote no filtered images"
    first = shots.Shot("first_screen", "#images", rgb, height=900)
    page = shots.take(server, str(tmp_path), (first,))["first_screen"]
    seen = _on_screen(page)
    assert ("photos/weights", rgb) in seen, sorted(seen)
    assert {("photos/weights", t) for t in response_tags} & set(seen), sorted(seen)
