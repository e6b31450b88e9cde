"""Screenshots of WeightWatch's views in a real TensorBoard, taken by headless Chromium.

The README's pictures come from this script, run on the demo's log directory:

    weightwatch demo --logdir weightwatch-demo
    python docs/make_screenshots.py weightwatch-demo docs/img

It starts `tensorboard --logdir LOGDIR` on 127.0.0.1, opens each dashboard in
Debian's Chromium (driven by Playwright, no browser download) and saves one PNG
per view. tests/integration/test_tensorboard_e2e.py runs the same functions on a
quick demo and asserts on what the server and the pages show.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from keras_weightwatch.demo import DIGITS_FIRST_CONV, DIGITS_MODEL, PHOTOS_FIRST_CONV, PHOTOS_MODEL
from keras_weightwatch.stats import STAT_NAMES
from keras_weightwatch.summaries import KERNELS, RESPONSES, SALIENCY
from keras_weightwatch.views.stats import NONFINITE_STATS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclass(frozen=True)
class Shot:
    """One dashboard to capture: its file name, URL fragment and the text to wait for."""

    name: str
    fragment: str
    wait_for: str
    height: int = 900
    click: str | None = None  # the text of a control to click first (a checkbox's label)
    width: int = 1400


def _filter(regex: str) -> str:
    """A URL fragment's `tagFilter` (the legacy dashboards' tag regex)."""
    return "tagFilter=" + urllib.parse.quote(regex, safe="")


# One picture per view. Image tags are `<model>/<section>/...` (`summaries.response_tag`,
# `kernel_tag`, `saliency_tag`); scalars are shown without smoothing and with every point
# in range. Each height is cut to what its view fills on the full demo's runs.
_STATS = "|".join(s for s in STAT_NAMES if s not in NONFINITE_STATS)
SHOTS = (
    Shot("features", "#text&tagFilter=features", "rank"),
    Shot("kernels", f"#images&{_filter(f'^{DIGITS_MODEL}/{KERNELS}/')}",
         f"{DIGITS_MODEL}/{KERNELS}/", height=720),
    Shot("rgb_kernels", f"#images&{_filter(f'/{KERNELS}/0_{PHOTOS_FIRST_CONV}/')}",
         f"{KERNELS}/0_{PHOTOS_FIRST_CONV}/kernel/image", height=680),
    # The photographs' responses are a row of 9 image-sized tiles: drawn at their own size
    # (1450 px wide), not shrunk into a 350 px card.
    Shot("rgb_responses", f"#images&{_filter(f'^{PHOTOS_MODEL}/{RESPONSES}/')}",
         f"{RESPONSES}/{PHOTOS_FIRST_CONV}/sample_1", height=600, width=1900,
         click="Show actual image size"),
    Shot("responses", f"#images&{_filter(f'/{RESPONSES}/{DIGITS_FIRST_CONV}/sample_[01]$')}",
         f"{RESPONSES}/{DIGITS_FIRST_CONV}", height=580),
    Shot("statistics",
         f"#scalars&_smoothingWeight=0&{_filter(f'^{DIGITS_FIRST_CONV}/kernel/({_STATS})$')}",
         f"{DIGITS_FIRST_CONV}/kernel/l2_norm", height=1000,
         click="Ignore outliers in chart scaling"),
    Shot("histograms", "#histograms&tagFilter=conv1%2Fkernel%2Fhistogram",
         "conv1/kernel/histogram", height=760),
    Shot("saliency", f"#images&{_filter(f'/{SALIENCY}/.*/sample_[01]$')}",
         f"/{SALIENCY}/", height=1190),
    Shot("gradients",
         f"#scalars&_smoothingWeight=0&{_filter('/kernel/grad_(norm|to_weight)$')}",
         f"{DIGITS_FIRST_CONV}/kernel/grad_norm", height=1000,
         click="Ignore outliers in chart scaling"),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tensorboard_command() -> list[str]:
    exe = shutil.which("tensorboard", path=os.path.dirname(sys.executable)) or shutil.which(
        "tensorboard"
    )
    return [exe] if exe else [sys.executable, "-m", "tensorboard.main"]


@contextlib.contextmanager
def serve(logdir: str, timeout: float = 120.0) -> Iterator[str]:
    """Run a real TensorBoard server on `logdir`; yields its base URL."""
    port = free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        tensorboard_command()
        + [
            "--logdir", os.fspath(logdir), "--host", "127.0.0.1", "--port", str(port),
            "--samples_per_plugin", "images=100", "--reload_interval", "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"tensorboard exited with {proc.returncode}: {err[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/data/runs", timeout=5) as r:
                    if r.status == 200 and r.read() not in (b"[]", b""):
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"tensorboard did not serve {logdir} within {timeout} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


# Walks the page and every open shadow root: the dashboards' visible text (one line per
# text node) and their images (src, decoded width, and where they are in the viewport).
_DEEP_JS = """() => {
  const texts = [], images = [];
  const walk = (root) => {
    for (const el of root.querySelectorAll('*')) {
      if (el.shadowRoot) walk(el.shadowRoot);
      if (el.tagName === 'IMG') {
        const r = el.getBoundingClientRect();
        images.push({src: el.src, width: el.naturalWidth, top: r.top, bottom: r.bottom,
                     left: r.left, right: r.right});
      }
      for (const n of el.childNodes) {
        if (n.nodeType === 3 && n.textContent.trim() && el.offsetParent !== null)
          texts.push(n.textContent.trim());
      }
    }
  };
  walk(document);
  return {text: texts.join('\\n'), images};
}"""


@dataclass(frozen=True)
class Page:
    """What one dashboard showed: its visible text and its images (src, decoded width, and
    top, bottom, left, right in CSS pixels of the viewport, before any scrolling)."""

    text: str
    images: list[dict]
    viewport: tuple[int, int] = (0, 0)  # (width, height)


def take(url: str, out_dir: str, shots: tuple[Shot, ...] = SHOTS,
         settle_ms: int = 2500) -> dict[str, Page]:
    """Screenshot each dashboard; returns {shot name: what the page showed}.

    Dashboards keep their content in shadow DOM, so the text and images are
    collected by walking every shadow root.
    """
    from playwright.sync_api import sync_playwright

    os.makedirs(out_dir, exist_ok=True)
    texts = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for shot in shots:
                page = browser.new_page(viewport={"width": shot.width, "height": shot.height})
                page.goto(f"{url}/?darkMode=false{shot.fragment}")
                page.get_by_text(shot.wait_for).first.wait_for(timeout=60_000)
                if shot.click:  # e.g. show the initial weights' point that "outliers" hides
                    page.get_by_text(shot.click).first.click()
                page.wait_for_timeout(settle_ms)  # let images and charts finish drawing
                page.screenshot(path=os.path.join(out_dir, f"{shot.name}.png"))
                seen = page.evaluate(_DEEP_JS)
                texts[shot.name] = Page(seen["text"], seen["images"], (shot.width, shot.height))
                page.close()
        finally:
            browser.close()
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="a log directory written by `weightwatch demo`")
    parser.add_argument("out_dir", nargs="?", default="docs/img", help="where the PNGs go")
    args = parser.parse_args(argv)
    with serve(args.logdir) as url:
        take(url, args.out_dir)
    for shot in SHOTS:
        print(os.path.join(args.out_dir, f"{shot.name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
