"""The README's fine-tuning pictures: a LoRA fine-tune in TensorBoard and in the WeightWatch tab.

    python docs/make_fine_tune_screenshots.py LOGDIR docs/img

Runs `examples/lora_fine_tune.py` into `LOGDIR/lora` (a CNN pre-trained on digits 0-4,
then fine-tuned on 5-9 with LoRA on its convolution and head, one of whose adapters is
kept from training with `--stuck`), starts `tensorboard --logdir LOGDIR` on 127.0.0.1 and
saves, from Debian's Chromium driven by Playwright: the adapters' table (text dashboard),
their update sizes (scalars) and the tab's run summary with its LoRA adapters table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from make_dashboard_screenshots import open_tab, shots

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "lora_fine_tune.py")

SHOTS = (
    shots.Shot("adapters_table", "#text&tagFilter=adapters", "NOT TRAINING", height=520),
    shots.Shot("adapters_update", "#scalars&_smoothingWeight=0&tagFilter=lora_update",
               "lora_update", height=560),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="where the fine-tune's run goes (LOGDIR/lora)")
    parser.add_argument("out_dir", nargs="?", default="docs/img")
    args = parser.parse_args(argv)
    subprocess.run([sys.executable, EXAMPLE, "--stuck", "--logdir",
                    os.path.join(args.logdir, "lora")], check=True)
    with shots.serve(args.logdir) as url:
        shots.take(url, args.out_dir, SHOTS)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shots.CHROMIUM, args=shots.CHROMIUM_ARGS)
            try:
                page, frame, _ = open_tab(browser, url, height=1100)
                frame.locator("#ww-adapters").wait_for(timeout=60_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=os.path.join(args.out_dir, "dashboard_adapters.png"))
            finally:
                browser.close()
    for name in [s.name for s in SHOTS] + ["dashboard_adapters"]:
        print(os.path.join(args.out_dir, f"{name}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
