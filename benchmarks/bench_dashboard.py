"""Time the WeightWatch tab: its first paint, and a compare of two 100M-parameter runs.

Writes two synthetic runs of about `--params` parameters each (bench_diff's
architecture: convolutions, then Dense layers of 2048 units, B = A plus noise with
one layer's units permuted), starts a real `tensorboard --logdir` server with the
WeightWatch plugin, and measures

- the compare route (`diff_runs` with matching, then the cached answer), over HTTP,
  and then the matched kernel grid of B (reordered by that diff's own unit order);
- the first paint of the tab in headless Chromium: from opening the page to the
  run-at-a-glance heatmap drawn (a fresh browser, then a second page);
- `diff_runs` of the same pair in this process, after the server: the cold compare's
  reference (their ratio is the tab's own overhead).

The timings start once the server is idle: TensorBoard goes on with its start-up work
(its one reload of the log directory, importing TensorFlow where it is installed) after it
first answers, on the same cores, which is no cost of the tab.

Usage:

    .venv/bin/python benchmarks/bench_dashboard.py [--params 100_000_000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "docs"))

from bench_diff import write_runs  # noqa: E402
from machine import machine  # noqa: E402
from tables import print_markdown  # noqa: E402

# The server runs the installed package's plugin; this starts one with it explicitly,
# so the benchmark also runs from a checkout that is not installed.
SERVER = """
import importlib.metadata, sys
from tensorboard import default, program
from keras_weightwatch.tensorboard_plugin import WeightWatchPlugin
plugins = default.get_plugins()
# an installed package's entry point already loads the plugin (a second one is an error)
if not any(e.name == "weightwatch"
           for e in importlib.metadata.entry_points(group="tensorboard_plugins")):
    plugins = plugins + [WeightWatchPlugin]
tb = program.TensorBoard(plugins=plugins)
tb.configure(argv=[None, "--logdir", sys.argv[1], "--port", sys.argv[2], "--host", "127.0.0.1",
                   "--reload_interval", "0"])
tb.main()
"""


def _timed_get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=3600) as r:
        body = r.read()
    return time.perf_counter() - t0, len(body)


def _cpu_seconds(pid: int) -> float | None:
    """The CPU time a process has used (all its threads), or None where /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settle(pid: int, quiet: float = 0.05, window: float = 1.0, limit: float = 120.0) -> float:
    """Wait until the server is idle: TensorBoard's own start-up work (its one reload of the
    log directory, importing TensorFlow where installed) goes on after it first answers, and
    a compare timed meanwhile would time that work too. Returns the seconds waited."""
    t0 = time.monotonic()
    last = _cpu_seconds(pid)
    while last is not None and time.monotonic() - t0 < limit:
        time.sleep(window)
        now = _cpu_seconds(pid)
        if now is None or now - last < quiet * window:
            break
        last = now
    return time.monotonic() - t0


def serve(logdir: str):
    import contextlib
    import subprocess

    from make_screenshots import free_port

    @contextlib.contextmanager
    def server():
        port = free_port()
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONPATH=os.pathsep.join([os.path.join(HERE, ".."),
                                               os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen([sys.executable, "-c", SERVER, logdir, str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tensorboard did not start (exit code {proc.returncode})")
                try:
                    urllib.request.urlopen(url + "/data/plugins_listing", timeout=5).read()
                    break
                except OSError:
                    time.sleep(0.5)
            print(f"server idle after {settle(proc.pid):.1f} s more (TensorBoard's start-up)",
                  flush=True)
            yield url
        finally:
            proc.terminate()
            proc.wait(30)

    return server()


def first_paint(url: str) -> tuple[float, float]:
    from make_dashboard_screenshots import open_tab, shots
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shots.CHROMIUM, args=shots.CHROMIUM_ARGS)
        try:
            page, _, cold = open_tab(browser, url)
            page.close()
            page, _, warm = open_tab(browser, url)
        finally:
            browser.close()
    return cold, warm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=100_000_000)
    p.add_argument("--no-browser", action="store_true", help="skip the first-paint timing")
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    args = p.parse_args()
    print(f"machine: {machine()}", flush=True)
    root = tempfile.mkdtemp(prefix="bench-dashboard-")
    rows: list[tuple[str, str]] = []
    try:
        a, b, total = write_runs(root, int(args.params))
        print(f"runs: 2 x {total / 1e6:.1f}M parameters ({total * 4 / 2**20:.0f} MiB each)")
        with serve(root) as url:
            q = f"{url}/data/plugin/weightwatch/compare?a=a&b=b"
            cold, size = _timed_get(q)
            cached, _ = _timed_get(q)
            rows += [("compare of the two runs, cold (`diff_runs` with matching, over HTTP)",
                      f"{cold:.2f} s"),
                     ("the same compare again (cached per pair of snapshots)",
                      f"{cached * 1000:.1f} ms")]
            print(f"compare (diff_runs with matching, over HTTP): cold {cold:.2f} s, "
                  f"cached {cached * 1000:.1f} ms ({size} bytes)", flush=True)
            with urllib.request.urlopen(q, timeout=3600) as r:
                conv = json.loads(r.read())["conv"]
            if conv:  # B's kernels in A's order: the cached diff's unit_order, no new matching
                grid, _ = _timed_get(f"{url}/data/plugin/weightwatch/compare_kernel.png?a=a&b=b"
                                     f"&which=b&key={urllib.parse.quote(conv[-1])}")
                print(f"compare kernel grid of B, matched ({conv[-1]}), after the compare: "
                      f"{grid * 1000:.1f} ms", flush=True)
                rows.append(("B's matched kernel grid after the compare (the cached diff's own "
                             "unit order, no second matching)", f"{grid * 1000:.1f} ms"))
            if not args.no_browser:
                c, w = first_paint(url)
                print(f"first paint of the tab (page open -> heatmap drawn): "
                      f"fresh browser {c:.2f} s, second page {w:.2f} s")
                rows[:0] = [("first paint of the tab (page opened until the heatmap is drawn), "
                             "a fresh browser", f"{c:.2f} s"),
                            ("the same, a second page", f"{w:.2f} s")]
        # the library alone on the same runs, after the server: the plugin's own overhead
        import scipy.optimize  # noqa: F401  (the server has it already: TensorFlow imports it)

        from keras_weightwatch import diff_runs

        t0 = time.perf_counter()
        diff_runs(a, b)
        reference = time.perf_counter() - t0
        print(f"reference: diff_runs(a, b) in this process {reference:.2f} s")
        print(f"cold compare / diff_runs: {cold / reference:.2f}x")
        if args.markdown:
            rows += [("`diff_runs(a, b)` alone, in the benchmark's process right after",
                      f"{reference:.2f} s"),
                     ("cold compare / `diff_runs`", f"{cold / reference:.2f}x")]
            print_markdown(["", "time"], rows, note=f" on {machine()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
