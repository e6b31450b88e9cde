"""The WeightWatch tab in a real TensorBoard, driven by headless Chromium.

    weightwatch demo --logdir weightwatch-demo
    python docs/make_dashboard_screenshots.py weightwatch-demo docs/img

Starts `tensorboard --logdir LOGDIR` (the plugin must be installed: it is found
through the package's `tensorboard_plugins` entry point), opens the WeightWatch
tab in Debian's Chromium (Playwright, no browser download), compares two runs,
steps the kernel slider through every snapshot (with the sample images' responses
at each step), opens the features and saves one PNG per panel.
tests/integration/test_dashboard_e2e.py runs the same functions and asserts on
what the page shows; benchmarks/bench_dashboard.py times them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
# Each picture cut to what its panel fills on the demo's runs.
HEIGHTS = {"dashboard_glance": 790, "dashboard_compare": 900, "dashboard_kernels": 1010,
           "dashboard_features": 720}


def _shots():
    spec = importlib.util.spec_from_file_location("make_screenshots",
                                                  os.path.join(HERE, "make_screenshots.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_screenshots", module)
    spec.loader.exec_module(module)
    return module


shots = _shots()


@dataclass
class Tab:
    """What the tab showed: the compare table's rows, the kernel steps reached, timings."""

    first_paint_s: float = 0.0
    compare_rows: dict[str, dict[str, str]] = field(default_factory=dict)
    kernel_steps: list[str] = field(default_factory=list)
    kernel_images: dict[str, str] = field(default_factory=dict)
    response_images: dict[str, list[str]] = field(default_factory=dict)
    """Step -> the URL of each sample's response image the page showed."""
    partners: dict[str, str] = field(default_factory=dict)
    """Feature -> the `correlated with` cell of the features table (non-empty ones)."""
    partner_marks: list[str] = field(default_factory=list)
    """The partner marks drawn on the features chart."""


def open_tab(browser, url: str, height: int = 900):
    """A page on the WeightWatch tab, its plugin frame, and the seconds to the first heatmap."""
    page = browser.new_page(viewport={"width": 1400, "height": height})
    t0 = time.perf_counter()
    page.goto(f"{url}/?darkMode=false#weightwatch")
    frame = page.frame_locator("iframe")
    frame.locator("#ww-heatmap").wait_for(timeout=120_000)
    return page, frame, time.perf_counter() - t0


def compare(frame, a: str, b: str, sa: str = "last", sb: str = "last") -> dict[str, dict]:
    """Pick runs A and B in the Compare panel; returns {tensor: {column: shown text}}."""
    frame.locator("#ww-tab-compare").click()
    frame.locator("#ww-a").select_option(a)
    frame.locator("#ww-sa").select_option(sa)
    frame.locator("#ww-b").select_option(b)
    frame.locator("#ww-sb").select_option(sb)
    frame.locator("#ww-compare-go").click()
    frame.locator("#ww-compare-table tbody tr").first.wait_for(timeout=120_000)
    rows = frame.locator("#ww-compare-table tbody tr")
    out = {}
    for i in range(rows.count()):
        cells = rows.nth(i).locator("td")
        values = {cells.nth(j).get_attribute("data-col"): cells.nth(j).inner_text()
                  for j in range(cells.count())}
        out[values["name"]] = values
    return out


def kernel_steps(frame, run: str, key: str
                 ) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """Move the kernel slider over every position: the steps shown, each kernel image's URL
    and each step's response image URLs (none where the run has no responses for `key`)."""
    frame.locator("#ww-tab-kernels").click()
    frame.locator("#ww-kernel-run").select_option(run)
    frame.locator("#ww-kernel-key").select_option(key)
    slider = frame.locator("#ww-kernel-slider")
    steps, images, responses = [], {}, {}
    for i in range(int(slider.get_attribute("max")) + 1):
        slider.fill(str(i))
        label = frame.locator("#ww-kernel-step")
        step = label.get_attribute("data-step")
        frame.locator(f'#ww-kernel-img[data-loaded-step="{step}"]').wait_for(timeout=60_000)
        steps.append(step)
        images[step] = frame.locator("#ww-kernel-img").get_attribute("src")
        shown = frame.locator(f'#ww-responses[data-loaded-step="{step}"] img.ww-response')
        if frame.locator("#ww-responses-none").count() == 0:
            shown.first.wait_for(timeout=60_000)
            responses[step] = [shown.nth(j).get_attribute("src") for j in range(shown.count())]
    return steps, images, responses


def features(frame, run: str | None = None) -> tuple[dict[str, str], list[str]]:
    """Open the Features panel (showing only `run`, when given): the non-empty `correlated
    with` cells of its table by feature, and the partner marks on its chart."""
    frame.locator("#ww-tab-features").click()
    frame.locator("#ww-features-chart").wait_for()
    if run is not None:
        boxes = frame.locator("input.ww-features-run")
        for i in range(boxes.count()):
            box = boxes.nth(i)
            if box.is_checked() != (box.get_attribute("data-run") == run):
                box.click()
        frame.locator(f'table.ww-features-table[data-run="{run}"]').wait_for()
    cells = frame.locator('table.ww-features-table td[data-col="partner"].ww-partner')
    partners = {}
    for i in range(cells.count()):
        row = cells.nth(i).locator("xpath=..")
        partners[row.get_attribute("data-feature")] = cells.nth(i).inner_text()
    marks = frame.locator("#ww-features-chart .ww-partner-mark")
    return partners, [marks.nth(i).text_content() for i in range(marks.count())]


def take(url: str, out_dir: str | None, a: str, b: str, kernel_run: str, key: str,
         features_run: str | None = None) -> Tab:
    """Drive every panel once (saving screenshots into `out_dir` when given); the Features
    panel shows `features_run` alone when given."""
    from playwright.sync_api import sync_playwright

    tab = Tab()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shots.CHROMIUM, args=shots.CHROMIUM_ARGS)
        try:
            page, frame, tab.first_paint_s = open_tab(browser, url, max(HEIGHTS.values()))
            def shot(name: str) -> None:
                if out_dir:
                    clip = {"x": 0, "y": 0, "width": 1400, "height": HEIGHTS[name]}
                    page.screenshot(path=os.path.join(out_dir, f"{name}.png"), clip=clip)
            frame.locator("#ww-glance-run").select_option(kernel_run)
            frame.locator("#ww-heatmap").click(position={"x": 200, "y": 50})
            frame.locator("#ww-tensor img").wait_for()
            page.wait_for_timeout(800)
            shot("dashboard_glance")
            tab.compare_rows = compare(frame, a, b)
            page.wait_for_timeout(1500)
            shot("dashboard_compare")
            tab.kernel_steps, tab.kernel_images, tab.response_images = kernel_steps(
                frame, kernel_run, key)
            page.wait_for_timeout(800)
            shot("dashboard_kernels")
            tab.partners, tab.partner_marks = features(frame, features_run)
            page.wait_for_timeout(500)
            shot("dashboard_features")
        finally:
            browser.close()
    return tab


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="a log directory written by `weightwatch demo`")
    parser.add_argument("out_dir", nargs="?", default="docs/img")
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    with shots.serve(args.logdir) as url:
        take(url, args.out_dir, "digits-seed1", "digits-seed2", "digits-seed1", "conv1/kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
