"""Where one fit's cost goes: each stage of each snapshot, on the thread that ran it.

Fits the reference CNN of `bench_overhead.py` (every view on, 4 sample images) and times
each stage of the pipeline with `time.thread_time()` (CPU of the calling thread) and
`time.perf_counter()` (wall), with the minor page faults of the thread (Linux), for every
snapshot of every fit after a warm-up fit: train begin (the plan, the run directory, the
first buffer set, the second), then each snapshot's statistics, store, commit and views.
The first snapshot of a fit is printed apart from the median of the later ones.

Run:  .venv/bin/python benchmarks/bench_worker_stages.py      (about 1 minute on 2 cores)
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import threading
import time

import bench_overhead as reference  # sets the backend before Keras is imported
from common import TimedWeightWatch, machine
from tables import print_markdown

from keras_weightwatch import capture, fitplan, pipeline, views  # noqa: E402

try:
    import resource

    def _faults() -> int:
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
except (ImportError, AttributeError):  # not Linux
    def _faults() -> int:
        return 0

LOG: list[tuple[str, str, float, float, int]] = []  # thread, stage, wall, cpu, faults

PIPELINE_STAGES = ("_stats", "_store", "_commit", "_write_views", "write", "fill")


def _timed(owner, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t0, c0, f0 = time.perf_counter(), time.thread_time(), _faults()
        try:
            return fn(*args, **kwargs)
        finally:
            LOG.append((threading.current_thread().name, label, time.perf_counter() - t0,
                        time.thread_time() - c0, _faults() - f0))

    setattr(owner, name, timed)


def instrument() -> None:
    """Time the train-begin steps, the pipeline's stages and each view's `write`."""
    _timed(fitplan.Plan, "make", "train begin: plan")
    _timed(pipeline.Pipeline, "open", "train begin: run directory")
    _timed(pipeline.Pipeline, "take", "capture (take)")
    _timed(capture.BufferPool, "fill", "second buffer set (fill)")
    _timed(pipeline.Pipeline, "_write_deferred", "snapshot: the initial one's views, deferred")
    for name in PIPELINE_STAGES[:-1]:
        _timed(pipeline.Pipeline, name, f"snapshot: {name.strip('_')}")
    for view in _view_classes():
        _timed(view, "write", f"  view {view.__name__}")


def _view_classes():
    import importlib
    import inspect
    import pkgutil

    found = []
    for info in pkgutil.iter_modules(views.__path__):
        module = importlib.import_module(f"{views.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and "write" in cls.__dict__:
                found.append(cls)
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fits", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    args = p.parse_args(argv)
    instrument()
    x, y = reference.digits(args.images)
    root = tempfile.mkdtemp(prefix="ww-bench-stages-")
    print(f"machine: {machine()}")
    per_fit = []
    for i in range(args.fits + 1):  # the first fit warms up imports and tracing
        model = reference.build()
        cb = TimedWeightWatch(os.path.join(root, f"run{i}"), histograms=True,
                              kernel_images=True, feature_layer="dense", top_k=5,
                              sample_images=x[:4])
        LOG.clear()
        model.fit(x, y, epochs=1 if i == 0 else args.epochs, batch_size=128, verbose=0,
                  callbacks=[cb])
        if i:
            per_fit.append((list(LOG), dict(cb.hook_times)))
    stages = report(per_fit)
    if args.markdown:
        print_markdown(["stage [thread]", "first snapshot of a fit: CPU ms", "wall ms",
                        "later snapshots (median): CPU ms", "wall ms"],
                       [(label, *cells) for label, cells in stages.items()],
                       note=f" on {machine()}")
    return 0


def report(per_fit) -> dict[str, list[str]]:
    """Print each stage's CPU, wall time and faults; returns {stage: the table's cells}."""
    first: dict[str, list[tuple[float, float, int]]] = {}
    later: dict[str, list[tuple[float, float, int]]] = {}
    hooks: dict[str, list[float]] = {}
    for log, hook_times in per_fit:
        writes = 0
        for thread, label, wall, cpu, faults in log:
            if label == "snapshot: write":
                writes += 1
            into = first if writes == 0 or label == "snapshot: write" and writes == 1 else later
            into.setdefault(f"{label} [{thread}]", []).append((wall, cpu, faults))
        for name, ts in hook_times.items():
            hooks.setdefault(name, []).extend(ts)
    print("\ntraining-thread hooks, median per call (wall):")
    for name, ts in hooks.items():
        print(f"  {name:16s} {statistics.median(ts) * 1e3:7.1f} ms")
    print(f"\n{'stage [thread]':52s} {'first snapshot of a fit':>26s} "
          f"{'later snapshots (median)':>28s}")
    print(f"{'':52s} {'cpu ms  wall ms faults':>26s} {'cpu ms  wall ms faults':>28s}")
    stages: dict[str, list[str]] = {}
    for label in dict.fromkeys([*first, *later]):
        cols = []
        cells = stages.setdefault(label, [])
        for table in (first, later):
            rows = table.get(label)
            if not rows:
                cols.append(" " * 22)
                cells += ["", ""]
                continue
            wall, cpu, faults = (statistics.median(c) for c in zip(*rows))
            cols.append(f"{cpu * 1e3:6.1f} {wall * 1e3:8.1f} {faults:6.0f}")
            cells += [f"{cpu * 1e3:.1f}", f"{wall * 1e3:.1f}"]
        print(f"{label:52s} {cols[0]:>26s} {cols[1]:>28s}")
    return stages


if __name__ == "__main__":
    raise SystemExit(main())
