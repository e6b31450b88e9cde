"""How fast a long run opens: `load_run` and `weightwatch show` with and without the index.

Target (issue 13, item 5): a run of 10,000 snapshots opens with `load_run` in <= 0.5 s and
`weightwatch show` ends in <= 1 s as a whole process. The run is written with `RunWriter`
(4 tiny tensors that change every snapshot, the callback's statistics, two logged metrics);
then, alternating, `load_run` in this process and `weightwatch show` as a new process are
timed with the snapshot index and without it (the index file moved aside: the path of a run
written before the index existed, which reads every snapshot file). Medians.

With `--compare-with TREE` (a source tree of another version of the package, e.g. an
exported older commit), that version's `weightwatch show` of the same run is timed too,
interleaved with this one's: before and after side by side. Each `show` runs from a neutral
directory with only its own tree on PYTHONPATH.

Run:  .venv/bin/python benchmarks/bench_long_run.py     (about 2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from machine import machine
from tables import print_markdown

from keras_weightwatch.capture import ModelInfo, Snapshot, WeightSpec
from keras_weightwatch.run import LocalStorage, RunWriter, load_run, open_run
from keras_weightwatch.run.index import INDEX_FILE
from keras_weightwatch.stats import tensor_stats

ARRAYS = {"dense/kernel": np.zeros((4, 8), "float32"), "dense/bias": np.zeros(8, "float32"),
          "out/kernel": np.zeros((8, 1), "float32"), "out/bias": np.zeros(1, "float32")}


def write_run(path: str, n: int) -> float:
    info = ModelInfo("m", "Sequential", (), tuple(
        WeightSpec(k, f"m/{k}", k.split("/")[0], a.shape, "float32", True)
        for k, a in ARRAYS.items()))
    t0 = time.perf_counter()
    writer = RunWriter.open(path, info, settings={}, versions={}, durable=False)
    prev: dict[str, np.ndarray] = {}
    for step in range(-1, n - 1):
        arrays = {k: a + step * 1e-3 for k, a in ARRAYS.items()}
        snap = Snapshot(step=step, label="initial" if step == -1 else "epoch",
                        epoch=None if step == -1 else step, arrays=arrays,
                        logs={} if step == -1 else {"loss": 1 / (step + 2), "mae": 0.5})
        stats = {k: tensor_stats(a, prev.get(k)) for k, a in arrays.items()}
        writer.commit_snapshot(snap, writer.store_tensors(snap), stats)
        prev = arrays
    writer.close()
    return time.perf_counter() - t0


HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_show(path: str, tree: str = HERE) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of `weightwatch show` as a new process, with the
    package imported from `tree`."""
    env = dict(os.environ, PYTHONPATH=tree)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "keras_weightwatch.cli", "show", path], check=True,
                   stdout=subprocess.DEVNULL, env=env, cwd=os.path.dirname(path))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime


def time_load(load) -> tuple[float, float, object]:
    t0, c0 = time.perf_counter(), time.process_time()
    run = load()
    return time.perf_counter() - t0, time.process_time() - c0, run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--snapshots", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    p.add_argument("--compare-with", metavar="TREE", default=None,
                   help="a source tree of another version: its `show` is timed too")
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    root = tempfile.mkdtemp(prefix="ww-bench-long-")
    path = os.path.join(root, "run")
    try:
        took = write_run(path, args.snapshots)
        print(f"run: {args.snapshots:,} snapshots of {len(ARRAYS)} tensors written in "
              f"{took:.1f} s; index {os.path.getsize(os.path.join(path, INDEX_FILE)) / 1e6:.1f} MB")
        index, aside = os.path.join(path, INDEX_FILE), os.path.join(root, "index-aside")
        kinds = ("load", "load0", "show", "show0", "other")
        wall: dict[str, list[float]] = {k: [] for k in kinds}
        cpu: dict[str, list[float]] = {k: [] for k in kinds}

        def note(kind, w, c):
            wall[kind].append(w)
            cpu[kind].append(c)

        for _ in range(args.repeats):
            w, c, run = time_load(lambda: load_run(path))
            note("load", w, c)
            w, c, run0 = time_load(lambda: open_run(LocalStorage(path), use_index=False))
            note("load0", w, c)
            if run.snapshots != run0.snapshots:  # type: ignore[attr-defined]
                raise SystemExit("the index and the snapshot files disagree")
            note("show", *time_show(path))
            if args.compare_with:
                note("other", *time_show(path, os.path.abspath(args.compare_with)))
            os.replace(index, aside)
            note("show0", *time_show(path))
            os.replace(aside, index)
        m = {k: statistics.median(v) for k, v in wall.items() if v}
        c = {k: statistics.median(v) for k, v in cpu.items() if v}
        print(f"medians of {args.repeats}, alternating (wall; CPU user+sys in brackets):")
        print(f"  load_run            with index {m['load']:6.3f} s [{c['load']:.3f}]   "
              f"without {m['load0']:6.3f} s [{c['load0']:.3f}]   (target <= 0.5 s at 10,000)")
        print(f"  weightwatch show    with index {m['show']:6.3f} s [{c['show']:.3f}]   "
              f"without {m['show0']:6.3f} s [{c['show0']:.3f}]   (whole process; target <= 1 s "
              "at 10,000)")
        if args.compare_with:
            print(f"  weightwatch show    of {args.compare_with}, with index {m['other']:6.3f} s "
                  f"[{c['other']:.3f}]")
            print(f"RATIO show wall {args.compare_with} / this: {m['other'] / m['show']:.2f}; "
                  f"CPU {c['other'] / c['show']:.2f}")
        print(f"RATIO load_run without / with index: {m['load0'] / m['load']:.2f}")
        print(f"RATIO show without / with index: {m['show0'] / m['show']:.2f}")
        if args.markdown:
            print_markdown(["", "measured", "target"], [
                (f"a run of {args.snapshots:,} snapshots: `load_run` / `weightwatch show` as a "
                 "whole process",
                 f"{m['load']:.3f} / {m['show']:.3f} s (without the index: "
                 f"{m['load0']:.3f} / {m['show0']:.3f} s)", "<= 0.5 / <= 1 s")],
                note=f" on {machine()}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
