"""What gradients add per snapshot on the reference CNN, on each backend.

The reference CNN (Conv32-Pool-Conv64-Flatten-Dense256-Dense10 on 28x28x1, 2.0M
parameters, trained for one short epoch on scikit-learn's digits, scaled to 28x28) and,
per snapshot: saliency of 4 sample images (vanilla gradient, SmoothGrad with
`--samples` noisy copies each, Grad-CAM on conv2) and the weight gradients of the
compiled loss on a 64-example probe batch. Each backend runs in its own subprocess;
each measurement is the median of `--repeats` calls after one warm-up call (the first
call's time, which includes tracing, is printed beside it), next to one inference
forward pass of the probe batch for scale.

Run:  .venv/bin/python benchmarks/bench_gradients.py        (about 1-2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from machine import machine

BACKENDS = ("tensorflow", "jax", "torch")

CHILD = r'''
import json, statistics, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import keras
from bench_overhead import digits
from keras_weightwatch import saliency
from keras_weightwatch.gradients import Loss, gradients

args = json.loads(sys.argv[2])
np.random.seed(0)
model = keras.Sequential([
    keras.Input((28, 28, 1)),
    keras.layers.Conv2D(32, 3, activation="relu", name="conv1"),
    keras.layers.MaxPooling2D(),
    keras.layers.Conv2D(64, 3, activation="relu", name="conv2"),
    keras.layers.Flatten(),
    keras.layers.Dense(256, activation="relu", name="dense"),
    keras.layers.Dense(10, name="logits"),
])
model.compile(optimizer="adam",
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
x, y = digits(max(args["train"], 64))
model.fit(x[: args["train"]], y[: args["train"]], epochs=1, batch_size=128, verbose=0)
samples, probe_x, probe_y = x[:4], x[:64], y[:64]

tasks = {
    "forward (64 images, inference)": lambda: model(probe_x, training=False),
    "vanilla (4 images)": lambda: saliency.vanilla(model, samples),
    f"smoothgrad (4 images x {args['samples']})":
        lambda: saliency.smoothgrad(model, samples, samples=args["samples"]),
    "gradcam conv2 (4 images)": lambda: saliency.gradcam(model, samples, layer="conv2"),
    "weight gradients (64 probe)":
        lambda: gradients(model, probe_x, Loss(probe_y), weights=True),
}
out = {"machine": None, "rows": []}
for name, fn in tasks.items():
    t0 = time.perf_counter(); fn(); first = time.perf_counter() - t0
    times = []
    for _ in range(args["repeats"]):
        t0 = time.perf_counter(); fn(); times.append(time.perf_counter() - t0)
    out["rows"].append([name, first, statistics.median(times)])
from machine import machine
out["machine"] = machine()
print(json.dumps(out))
'''


def run_backend(backend: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    here = os.path.dirname(os.path.abspath(__file__))
    params = json.dumps({"train": args.train, "samples": args.samples, "repeats": args.repeats})
    proc = subprocess.run([sys.executable, "-c", CHILD, here, params], env=env,
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"{backend} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=1024, help="training images (one epoch)")
    p.add_argument("--samples", type=int, default=8, help="SmoothGrad copies per image")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"model: Conv32-Pool-Conv64-Flatten-Dense256-Dense10 on 28x28x1; medians of "
          f"{args.repeats} calls after a first (tracing) call; each backend in a subprocess")
    sys.stdout.flush()
    table = []
    for backend in args.backends.split(","):
        result = run_backend(backend, args)
        print(f"\n{backend}: {result['machine'].split('; ', 1)[1]}")
        added = 0.0
        for name, first, median in result["rows"]:
            if not name.startswith("forward"):
                added += median
            print(f"  {name:34s} {median * 1e3:8.1f} ms  (first call {first * 1e3:8.1f} ms)")
        print(f"  ADDED per snapshot (saliency + weight gradients): {added * 1e3:.1f} ms")
        sys.stdout.flush()
        table.append((backend, *(f"{median * 1e3:.1f} ms" for _, _, median in result["rows"]),
                      f"**{added * 1e3:.1f} ms**"))
    if args.markdown and table:
        from tables import print_markdown

        names = [name for name, _, _ in result["rows"]]
        print_markdown(["backend", *names, "added per snapshot (all but the forward pass)"],
                       table, note=f" on {machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
