"""The WeightWatch tab's health findings in a real TensorBoard, driven by headless Chromium.

    python docs/make_health_screenshots.py weightwatch-health docs/img

Trains `planted`, a small model with three problems planted on purpose (a layer behind
`stop_gradient`, two layers with a constant kernel initialiser, of which the first stays
symmetric, ReLU units with a bias of -10), into LOGDIR/planted unless it is there, starts
`tensorboard --logdir LOGDIR` (the plugin must be installed), opens the WeightWatch tab on
that run and saves `health_tab.png`: the findings list on top and the marked cells of the
heatmap.
tests/integration/test_dashboard_e2e.py runs the same functions and asserts on what the
page shows.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = "planted"
PLANTED = {"not_learning": "detached", "symmetry": "constant", "dead_units": "dead"}
"""The findings the planted run must show: rule -> layer."""
EPOCHS = 5
HEIGHT = 680
"""The picture, cut to the findings list and the heatmap of the planted run."""


def _dash():
    name = "make_dashboard_screenshots"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


dash = _dash()


def _dead_bias(shape, dtype=None):
    import numpy as np

    n = int(shape[0])
    return np.r_[np.full(n - n // 4, -10.0), np.zeros(n // 4)].astype("float32")


def planted_run(run_dir: str) -> list[str]:
    """Train the planted model for `EPOCHS` epochs into `run_dir`, with a probe batch
    (`gradient_data`); returns the health warnings WeightWatch gave during the fit."""
    import keras
    import numpy as np

    from keras_weightwatch import WeightWatch, WeightWatchWarning

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(8, 1))).astype("float32")
    inputs = keras.Input((8,))
    h = keras.layers.Dense(32, activation="relu", name="detached")(inputs)
    h = keras.layers.Lambda(keras.ops.stop_gradient, name="stop")(h)
    constant = keras.initializers.Constant(0.1)
    h = keras.layers.Dense(16, activation="relu", name="constant", kernel_initializer=constant)(h)
    h = keras.layers.Dense(16, activation="relu", name="constant2", kernel_initializer=constant)(h)
    h = keras.layers.Dense(32, activation="relu", name="dead", bias_initializer=_dead_bias)(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", WeightWatchWarning)
        warnings.filterwarnings("ignore", "Gradients do not exist")  # stop_gradient: planted
        model.fit(x, y, epochs=EPOCHS, batch_size=64, verbose=0, shuffle=False, callbacks=[
            WeightWatch(run_dir, histograms=False, kernel_images=False,
                        gradient_data=(x[:64], y[:64]))])
    return [str(w.message) for w in caught if issubclass(w.category, WeightWatchWarning)]


@dataclass
class Health:
    """What the tab showed: the findings list's rows and the heatmap's marks."""

    rows: list[dict[str, str]] = field(default_factory=list)
    """Each finding row: {column: shown text}, plus `rule` and `key` (its data attributes)."""
    marks: list[dict[str, str]] = field(default_factory=list)
    """Each mark: `rule`, `key`, `step`, its `title`, `visible`, `box` (where it is on the page:
    x, y, width, height) and `tooltip`, the heatmap's tooltip with the pointer on the mark."""
    notes: str = ""
    """The notes line (what the run lacks for some rules)."""


def read(frame) -> Health:
    """The findings list and heatmap marks of the run the glance panel shows."""
    out = Health()
    rows = frame.locator("#ww-findings tr.ww-finding")
    for i in range(rows.count()):
        row = rows.nth(i)
        cells = row.locator("td")
        values = {cells.nth(j).get_attribute("data-col"): cells.nth(j).inner_text()
                  for j in range(cells.count())}
        values.update(rule=row.get_attribute("data-rule"), key=row.get_attribute("data-key"))
        out.rows.append(values)
    canvas = frame.locator("#ww-heatmap")
    marks = frame.locator("#ww-heatmap ~ .ww-mark")
    for i in range(marks.count()):
        m = marks.nth(i)
        box, at = m.bounding_box(), canvas.bounding_box()
        canvas.hover(position={"x": box["x"] + box["width"] / 2 - at["x"],
                               "y": box["y"] + box["height"] / 2 - at["y"]})
        out.marks.append({"rule": m.get_attribute("data-rule"), "key": m.get_attribute("data-key"),
                          "step": m.get_attribute("data-step"), "title": m.get_attribute("title"),
                          "visible": m.is_visible(), "box": box,
                          "tooltip": canvas.get_attribute("title")})
    notes = frame.locator("#ww-health-notes")
    out.notes = notes.inner_text() if notes.count() else ""
    return out


def take(url: str, out_dir: str | None, run: str = RUN) -> Health:
    """Open the tab on `run`, wait for its findings and marks, read them (and save
    `health_tab.png` into `out_dir` when given)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=dash.shots.CHROMIUM,
                                    args=dash.shots.CHROMIUM_ARGS)
        try:
            page, frame, _ = dash.open_tab(browser, url, HEIGHT)
            frame.locator("#ww-glance-run").select_option(run)
            frame.locator("#ww-findings tr.ww-finding").first.wait_for(timeout=120_000)
            frame.locator("#ww-heatmap ~ .ww-mark").first.wait_for(timeout=120_000)
            page.wait_for_timeout(500)
            if out_dir:
                page.screenshot(path=os.path.join(out_dir, "health_tab.png"),
                                clip={"x": 0, "y": 0, "width": 1400, "height": HEIGHT})
            shown = read(frame)
        finally:
            browser.close()
    return shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="where the planted run is (or is trained into)")
    parser.add_argument("out_dir", nargs="?", default="docs/img")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if not os.path.exists(os.path.join(args.logdir, RUN)):
        planted_run(os.path.join(args.logdir, RUN))
    with dash.shots.serve(args.logdir) as url:
        shown = take(url, args.out_dir)
    print(f"{len(shown.rows)} findings, {len(shown.marks)} marks:",
          ", ".join(f"{r['rule']} in {r['layer']}" for r in shown.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
