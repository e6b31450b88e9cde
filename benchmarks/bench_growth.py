"""How the cost of a snapshot grows with the parameter count, on the run-writer side.

Issue 13, item 7: at 1M, 10M, 100M and 400M parameters (4 Dense-like kernels of equal
width and their biases, float32; every tensor changed since the previous snapshot), the
bytes a snapshot adds to the run directory and the time `RunWriter` takes to persist it
(`store_tensors` + `commit_snapshot`, durable; the median of `--repeats`), beside the
bytes of TensorBoard event file that `keras.callbacks.TensorBoard(histogram_freq=1)` adds
per epoch for the same weights (one `tf.summary.histogram` per weight, named as Keras
names it; its scalars and graph are left out). A size whose arrays do not fit in memory
(two sets are held) is skipped with the reason printed.

The training-thread hold and the worker's CPU time per snapshot are pipeline columns;
they are printed as "-" until the pipeline benchmark fills them in.

Run:  .venv/bin/python benchmarks/bench_growth.py        (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import shutil
import statistics
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
from bench_write import arrays_of, info_of, writer_write  # noqa: E402
from machine import machine  # noqa: E402

from keras_weightwatch.run import RunWriter  # noqa: E402

DEPTH = 4
# tf.summary.histogram (what keras TensorBoard calls) allocates elements x 30 float64.
TB_MAX_ELEMENTS = 5_000_000


def shapes_for(params: int) -> dict[str, tuple[int, ...]]:
    width = max(1, round(math.sqrt(params / DEPTH)))
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(DEPTH):
        shapes[f"dense_{i}/kernel"] = (width, width)
        shapes[f"dense_{i}/bias"] = (width,)
    return shapes


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def tensorboard_bytes(root: str, arrays: dict[str, np.ndarray]) -> int:
    """Bytes of the histograms keras.callbacks.TensorBoard(histogram_freq=1) writes per epoch."""
    import tensorflow as tf

    logdir = os.path.join(root, "tb")
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for key, a in arrays.items():
            tf.summary.histogram(key.replace("/", "_") + "/histogram", a, step=1)
    writer.flush()
    writer.close()
    size = sum(os.path.getsize(p) for p in glob.glob(os.path.join(logdir, "*")))
    shutil.rmtree(logdir)
    return size


def measure(root: str, params: int, repeats: int, tensorboard: bool) -> dict[str, float]:
    shapes = shapes_for(params)
    sets = [arrays_of(shapes, s) for s in (0, 1)]
    n = sum(a.size for a in sets[0].values())
    path = os.path.join(root, f"run{params}")
    writer = RunWriter.open(path, info_of(shapes), settings={}, versions={}, durable=True)
    writer_write(writer, 0, sets[1])
    times, added = [], []
    for r in range(repeats):
        before = du(path)
        times.append(writer_write(writer, r + 1, sets[r % 2]))
        added.append(du(path) - before)
        writer.apply_retention(keep_last=1)
    writer.close()
    shutil.rmtree(path)
    tb = float("nan")
    if tensorboard and max(a.size for a in sets[0].values()) <= TB_MAX_ELEMENTS:
        tb = tensorboard_bytes(root, sets[0])
    elif tensorboard:
        print(f"  (no TensorBoard column at {n:,} parameters: tf.summary.histogram builds a "
              f"one-hot float64 tensor of 30 values per element; measured up to "
              f"{TB_MAX_ELEMENTS:,} elements per tensor, at 100M parameters it ran out of "
              "memory on a 24 GB machine)")
    sys.stdout.flush()
    return {"params": n, "bytes": statistics.median(added), "write": statistics.median(times),
            "tb": tb}


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default="1e6,1e7,1e8,4e8",
                   help="comma-separated parameter counts")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--dir", default=None)
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    root = tempfile.mkdtemp(prefix="ww-bench-growth-", dir=args.dir)
    rows = []
    try:
        for params in (int(float(x)) for x in args.params.split(",")):
            need = 2 * 4 * params * 1.2
            if need > available_bytes() or need > shutil.disk_usage(root).free:
                print(f"skipped {params:,} parameters: {need / 1e9:.1f} GB needed (two "
                      f"sets of arrays, and as much disk), {available_bytes() / 1e9:.1f} GB "
                      "memory available")
                continue
            rows.append(measure(root, params, args.repeats, not args.no_tensorboard))
            print(f"  {rows[-1]['params']:>12,} parameters: {rows[-1]['write']:.3f} s")
            sys.stdout.flush()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nper snapshot (median of {args.repeats}; {DEPTH} kernels + biases, float32, "
          "every tensor changed):")
    head = ("parameters", "run bytes", "bytes/param", "write s", "s per 100M", "TB hist bytes",
            "hold s", "worker CPU s")
    print("  ".join(f"{h:>13}" for h in head))
    for r in rows:
        cells = (f"{r['params']:,}", f"{r['bytes']:,.0f}", f"{r['bytes'] / r['params']:.4f}",
                 f"{r['write']:.3f}", f"{r['write'] / r['params'] * 1e8:.3f}",
                 f"{r['tb']:,.0f}", "-", "-")
        print("  ".join(f"{c:>13}" for c in cells))
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        growth = b["params"] / a["params"]
        tbs = [r for r in rows if r["tb"] == r["tb"]]
        tb = (f"; TensorBoard histogram bytes x{tbs[-1]['tb'] / tbs[0]['tb']:.2f} from "
              f"{tbs[0]['params']:,} to {tbs[-1]['params']:,}" if len(tbs) >= 2 else "")
        print(f"GROWTH {a['params']:,} -> {b['params']:,} parameters (x{growth:.0f}): run bytes "
              f"x{b['bytes'] / a['bytes']:.1f}, write time x{b['write'] / a['write']:.1f}{tb}")
    print("(hold and worker CPU: pipeline columns, filled in by the pipeline benchmark)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
