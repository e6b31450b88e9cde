"""How long WeightWatch holds up training, and how much memory it adds, for a 100M-parameter model.

Targets: the time `on_epoch_end` holds up training is at most 2x the time of
`model.get_weights()` itself, measured at the same point (right after an epoch), median
over epochs; the worst hold over every epoch of every fit (the first included) is at most
3x a warm memcpy of the weight bytes; the peak extra memory is at most 2x the model's
weight bytes.

Three kinds of fit run alternately (`alone` once, the others `--repeats` times), on one
model (the weights keep training; every fit gets a fresh callback and run directory):

- `alone`: fit with no callback, for the memory that training itself takes;
- `get_weights`: a callback times `model.get_weights()` at each epoch end;
- `weightwatch`: `WeightWatch` with its defaults (statistics, histograms, snapshots every
  epoch), each hook timed, and the worker's time per snapshot.

Memory is the process's resident set size, sampled every 2 ms during each fit; "extra" is
the peak minus the RSS just before that fit. WeightWatch's own extra memory is its peak
extra minus the median peak extra of `alone` (training's own temporaries).

Run:  .venv/bin/python benchmarks/bench_100m.py            (about 2-3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before Keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import WORKER_TIMES, TimedWeightWatch, machine, med, time_worker  # noqa: E402
from tables import print_markdown  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class RssPeak:
    """Samples RSS on a thread; `extra` is the peak over the value at start."""

    def __enter__(self):
        self.base = rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.base


class GetWeightsTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        t0 = time.perf_counter()
        weights = self.model.get_weights()
        self.times.append(time.perf_counter() - t0)
        del weights


def warm_memcpy(model) -> float:
    """The best of 5 copies of the weights' bytes into buffers already touched."""
    src = [np.asarray(w) for w in model.get_weights()]
    dst = [np.array(a, copy=True) for a in src]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for d, a in zip(dst, src):
            np.copyto(d, a)
        best = min(best, time.perf_counter() - t0)
    return best


def build(width: int, depth: int) -> keras.Model:
    layers = [keras.Input((width,))]
    layers += [keras.layers.Dense(width, activation="relu") for _ in range(depth - 1)]
    layers += [keras.layers.Dense(width)]
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.SGD(1e-4), loss="mse")
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=6, help="Dense layers of width x width")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--steps", type=int, default=24, help="batches per epoch")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=None, help="where runs are written (default: a temp dir)")
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    args = p.parse_args(argv)

    time_worker()
    keras.utils.set_random_seed(0)
    model = build(args.width, args.depth)
    n_params = model.count_params()
    weight_bytes = sum(w.numpy().nbytes for w in model.weights)
    rng = np.random.default_rng(0)
    n = args.steps * args.batch
    x = rng.normal(size=(n, args.width)).astype("float32")
    y = rng.normal(size=(n, args.width)).astype("float32")
    print(f"machine: {machine()}")
    print(f"model: {args.depth} x Dense({args.width}) = {n_params:,} parameters, "
          f"{weight_bytes / 1e6:.0f} MB of weights; {args.epochs} epochs x {args.steps} "
          f"batches of {args.batch}; {args.repeats} repeats, alternating")
    sys.stdout.flush()

    root = args.dir or tempfile.mkdtemp(prefix="ww-bench-100m-")
    model.fit(x, y, epochs=1, batch_size=args.batch, verbose=0)  # warm up: trace, allocate

    results = {"alone": [], "get_weights": [], "weightwatch": []}
    gw_times: list[float] = []
    hooks: dict[str, list[float]] = {}
    fit_times = {k: [] for k in results}
    sets: list[int] = []
    for r in range(args.repeats):
        # Training's own memory is measured once; the two timed kinds alternate.
        for kind in ("alone", "get_weights", "weightwatch") if r == 0 else ("get_weights",
                                                                              "weightwatch"):
            cbs = []
            if kind == "get_weights":
                timer = GetWeightsTimer()
                cbs = [timer]
            elif kind == "weightwatch":
                ww = TimedWeightWatch(os.path.join(root, f"run{r}"))
                cbs = [ww]
                WORKER_TIMES.clear()
            with RssPeak() as mem:
                t0 = time.perf_counter()
                model.fit(x, y, epochs=args.epochs, batch_size=args.batch, verbose=0,
                          callbacks=cbs)
                fit_times[kind].append(time.perf_counter() - t0)
            results[kind].append(mem.extra)
            if kind == "get_weights":
                gw_times += timer.times
            elif kind == "weightwatch":
                for name, ts in ww.hook_times.items():
                    hooks.setdefault(name, []).extend(ts)
                hooks.setdefault("worker per snapshot", []).extend(WORKER_TIMES)
                sets.append(ww.buffer_sets)
            print(f"  repeat {r} {kind:12s} fit {fit_times[kind][-1]:6.2f} s, "
                  f"peak RSS over start {mem.extra / 1e6:7.0f} MB")
            sys.stdout.flush()

    hold = med(hooks["on_epoch_end"])
    worst = max(hooks["on_epoch_end"])
    copy = warm_memcpy(model)
    gw = med(gw_times)
    alone_extra = med(results["alone"])
    ww_extra = max(results["weightwatch"])
    print()
    print("training-thread time inside WeightWatch's hooks (median per call, max):")
    for name in ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_end"):
        ts = hooks.get(name, [])
        print(f"  {name:16s} {med(ts) * 1e3:8.1f} ms   (max {max(ts) * 1e3:8.1f} ms, n={len(ts)})")
    wt = hooks["worker per snapshot"]
    print(f"  worker per snapshot {med(wt):6.2f} s (max {max(wt):.2f} s, n={len(wt)}; "
          "hashing, statistics, histograms, writing with fsync)")
    print(f"get_weights() after an epoch: median {gw * 1e3:.1f} ms (n={len(gw_times)}, "
          f"min {min(gw_times) * 1e3:.1f}, max {max(gw_times) * 1e3:.1f})")
    print()
    print(f"warm memcpy of the weights (into touched buffers): {copy * 1e3:.1f} ms (best of 5)")
    print(f"RATIO on_epoch_end hold / get_weights(): {hold / gw:.2f}  (median; target <= 2)")
    print(f"RATIO worst on_epoch_end hold / warm memcpy: {worst / copy:.2f}  "
          f"({worst * 1e3:.1f} / {copy * 1e3:.1f} ms, every epoch of every fit; target <= 3)")
    print(f"peak extra RSS: fit alone {alone_extra / 1e6:.0f} MB (median), fit + WeightWatch "
          f"{ww_extra / 1e6:.0f} MB (max)")
    net = ww_extra - alone_extra
    print(f"host buffer sets WeightWatch allocated per fit: {sets} (1 = the worker kept up)")
    print(f"RATIO WeightWatch's extra memory / weight bytes: {net / weight_bytes:.2f}  "
          f"({net / 1e6:.0f} MB / {weight_bytes / 1e6:.0f} MB; target <= 2; without subtracting "
          f"training's own: {ww_extra / weight_bytes:.2f})")
    snap_bytes = []
    for r in range(args.repeats):
        d = os.path.join(root, f"run{r}", "tensors")
        snap_bytes.append(sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)))
    per = snap_bytes[0] / (args.epochs + 1)
    print(f"disk: {snap_bytes[0] / 1e6:.0f} MB for {args.epochs + 1} snapshots "
          f"({per / weight_bytes:.3f} x weight bytes each; every tensor changes each epoch)")
    if args.markdown:
        size = f"{n_params / 1e6:.1f}M parameters"
        print_markdown(["", "measured", "target"], [
            (f"{size}: `on_epoch_end` hold / `get_weights()` at the same point",
             f"median {hold * 1e3:.1f} / {gw * 1e3:.0f} ms = {hold / gw:.2f}", "<= 2"),
            (f"{size}: **worst** `on_epoch_end` hold over every epoch of every fit / a warm "
             "memcpy of the weight bytes",
             f"{worst * 1e3:.1f} / {copy * 1e3:.1f} ms = **{worst / copy:.2f}**", "<= 3"),
            (f"{size}: peak extra RSS / weight bytes",
             f"{net / 1e6:.0f} / {weight_bytes / 1e6:.0f} MB = {net / weight_bytes:.2f}", "<= 2"),
            (f"{size}: disk per snapshot / weight bytes", f"{per / weight_bytes:.3f}", ""),
        ], note=f" on {machine()}")
    if args.dir is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
