"""The documentation site's pictures: its front page and the API page at `diff_runs`.

Build the site first (`make docs`), then:

    python docs/make_site_screenshots.py site docs/img

serves the built site on a local port and photographs it with headless Chromium (the
system browser, driven by Playwright as docs/make_screenshots.py does), 1400 x 1000.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import threading
from collections.abc import Iterator

CHROMIUM = "/usr/bin/chromium"
SHOTS = (("site_home.png", ""), ("site_api.png", "api/#keras_weightwatch.diff_runs"))


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass


@contextlib.contextmanager
def serve(site_dir: str) -> Iterator[str]:
    """`site_dir` over HTTP on 127.0.0.1 and a free port, for as long as the block runs."""
    handler = functools.partial(_Quiet, directory=site_dir)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def take(url: str, out_dir: str) -> list[str]:
    """Each page of SHOTS, once the page and its scripts are loaded; returns the files."""
    from playwright.sync_api import sync_playwright

    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for name, path in SHOTS:
            page.goto(url + path, wait_until="networkidle")
            page.wait_for_timeout(1000)  # the theme's scripts place the navigation
            out = os.path.join(out_dir, name)
            page.screenshot(path=out)
            written.append(out)
        browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site_dir", nargs="?", default="site", help="the built site")
    parser.add_argument("out_dir", nargs="?", default="docs/img", help="where the PNGs go")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.site_dir, "index.html")):
        parser.error(f"no built site in {args.site_dir} (run `make docs` first)")
    with serve(os.path.abspath(args.site_dir)) as url:
        for out in take(url, args.out_dir):
            print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
