"""How the cost of a snapshot grows with the parameter count.

Issue 13, item 7: at 1M, 10M, 100M and 400M parameters (4 Dense kernels of equal width
and their biases, float32; every tensor changed since the previous snapshot), per snapshot:

- the bytes it adds to the run directory and the time `RunWriter` takes to persist it
  (`store_tensors` + `commit_snapshot`, durable; the median of `--repeats`);
- from a fit of that model (4 x Dense, SGD, one batch per epoch, `--epochs`) with
  `WeightWatch` and its default views: the training thread's hold in `on_epoch_end`
  (median), the worker's CPU (its thread's CPU between two epoch starts, median), and the
  bytes WeightWatch's TensorBoard event file grows by. Each epoch starts once the worker is
  idle, so the hold is the copy of the weights, not the wait of an epoch shorter than a
  snapshot's processing (`max_queue` back-pressure);
- beside them, the bytes of event file that `keras.callbacks.TensorBoard(histogram_freq=1)`
  adds per epoch for the same weights (one `tf.summary.histogram` per weight, named as Keras
  names it; its scalars and graph are left out).

A size whose arrays do not fit in memory is skipped with the reason printed.

Run:  .venv/bin/python benchmarks/bench_growth.py        (about 4 minutes on 2 cores)
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
from common import WORKER_CPU, TimedWeightWatch, machine, med, time_worker  # noqa: E402
from machine import available_bytes  # noqa: E402
from tables import print_markdown  # noqa: E402

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


class WaitForWorker:
    """Keras callback placed before WeightWatch: each epoch starts once WeightWatch's worker
    is idle, and the worker's CPU since the previous epoch start (one whole snapshot: its
    store and its views) is appended to `cpu`."""

    def __init__(self, ww: TimedWeightWatch):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(cb, epoch, logs=None):  # noqa: N805
                ww.pipeline.join()
                cpu.append(sum(WORKER_CPU[self._mark:]))
                self._mark = len(WORKER_CPU)

        cpu: list[float] = []
        self.cpu = cpu
        self._mark = len(WORKER_CPU)
        self.callback = Callback()


def events_bytes(log_dir: str) -> int:
    return sum(os.path.getsize(p) for p in
               glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True))


def pipeline(root: str, params: int, epochs: int) -> dict[str, float]:
    """Hold, worker CPU and event bytes per snapshot of a fit with WeightWatch (see above)."""
    import keras

    width = shapes_for(params)["dense_0/bias"][0]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((width,))] +
                             [keras.layers.Dense(width) for _ in range(DEPTH)])
    model.compile(optimizer=keras.optimizers.SGD(1e-6), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, width), dtype=np.float32)
    model.fit(x, x, epochs=1, batch_size=8, verbose=0)  # trace and allocate first
    log_dir = os.path.join(root, f"fit{params}")
    ww = TimedWeightWatch(log_dir)
    wait = WaitForWorker(ww)
    sizes: list[int] = []

    class EventBytes(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):  # after the wait: the previous snapshot's
            sizes.append(events_bytes(log_dir))

    model.fit(x, x, epochs=epochs, batch_size=8, verbose=0,
              callbacks=[wait.callback, EventBytes(), ww])
    growth = [b - a for a, b in zip(sizes[1:], sizes[2:])]  # whole epoch snapshots only
    out = {"hold": med(ww.hook_times["on_epoch_end"]), "worker": med(wait.cpu[2:]),
           "events": med(growth)}
    del model, ww
    shutil.rmtree(log_dir)
    return out


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default="1e6,1e7,1e8,4e8",
                   help="comma-separated parameter counts")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5,
                   help="epochs of the fit with WeightWatch (at least 4: the medians are of "
                        "the snapshots after the first epoch's)")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    p.add_argument("--dir", default=None)
    args = p.parse_args(argv)
    if args.epochs < 4:
        p.error(f"--epochs must be at least 4. Received: epochs={args.epochs}")
    time_worker()
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
            # the model, its gradients, WeightWatch's two buffer sets, training's temporaries
            if 5 * 4 * params * 1.2 <= available_bytes():
                rows[-1].update(pipeline(root, params, args.epochs))
            else:
                print(f"  (no fit at {params:,} parameters: {available_bytes() / 1e9:.1f} GB "
                      "memory available)")
            r = rows[-1]
            print(f"  {r['params']:>12,} parameters: write {r['write']:.3f} s, hold "
                  f"{r.get('hold', math.nan) * 1e3:.1f} ms, worker CPU "
                  f"{r.get('worker', math.nan):.3f} s")
            sys.stdout.flush()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nper snapshot (median of {args.repeats}; {DEPTH} kernels + biases, float32, "
          "every tensor changed):")
    head = ("parameters", "run bytes", "bytes/param", "write s", "s per 100M", "hold ms",
            "worker CPU s", "event bytes", "TB hist bytes")
    print("  ".join(f"{h:>13}" for h in head))
    for r in rows:
        cells = (f"{r['params']:,}", f"{r['bytes']:,.0f}", f"{r['bytes'] / r['params']:.4f}",
                 f"{r['write']:.3f}", f"{r['write'] / r['params'] * 1e8:.3f}",
                 f"{r.get('hold', math.nan) * 1e3:.1f}", f"{r.get('worker', math.nan):.3f}",
                 f"{r.get('events', math.nan):,.0f}", f"{r['tb']:,.0f}")
        print("  ".join(f"{c:>13}" for c in cells))
    if len(rows) >= 2:
        print_growth(rows)
    if args.markdown:
        markdown(rows)
    return 0


def markdown(rows: list[dict[str, float]]) -> None:
    """The docs' table (Overhead: how the cost of a snapshot grows with the model)."""
    def known(value: float, text: str) -> str:
        return text if value == value else "not measured"

    print_markdown(
        ["parameters", "bytes on disk", "`on_epoch_end` hold", "worker CPU",
         "WeightWatch event bytes", "keras TensorBoard histogram bytes"],
        [(f"{r['params'] / 1e6:.1f}M", f"{r['bytes'] / 1e6:,.1f} MB",
          known(r.get("hold", math.nan), f"{r.get('hold', math.nan) * 1e3:.1f} ms"),
          known(r.get("worker", math.nan), f"{r.get('worker', math.nan):.3f} s"),
          known(r.get("events", math.nan), f"{r.get('events', math.nan):,.0f}"),
          known(r["tb"], f"{r['tb']:,.0f}")) for r in rows],
        label_columns=0, note=f" on {machine()}")


def print_growth(rows: list[dict[str, float]]) -> None:
    a, b = rows[0], rows[-1]
    fits = [r for r in rows if "hold" in r]
    fit = (f", hold x{fits[-1]['hold'] / fits[0]['hold']:.1f}, worker CPU "
           f"x{fits[-1]['worker'] / fits[0]['worker']:.1f}, event bytes "
           f"x{fits[-1]['events'] / fits[0]['events']:.2f} (fits from {fits[0]['params']:,} to "
           f"{fits[-1]['params']:,})" if len(fits) >= 2 else "")
    tbs = [r for r in rows if r["tb"] == r["tb"]]
    tb = (f"; TensorBoard histogram bytes x{tbs[-1]['tb'] / tbs[0]['tb']:.2f} from "
          f"{tbs[0]['params']:,} to {tbs[-1]['params']:,}" if len(tbs) >= 2 else "")
    print(f"GROWTH {a['params']:,} -> {b['params']:,} parameters (x{b['params'] / a['params']:.0f}"
          f"): run bytes x{b['bytes'] / a['bytes']:.1f}, write time x{b['write'] / a['write']:.1f}"
          f"{fit}{tb}")


if __name__ == "__main__":
    raise SystemExit(main())
