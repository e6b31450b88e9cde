"""Time and memory of `weightwatch diff` on two synthetic 100M-parameter runs.

Writes two runs of one made-up architecture (convolutions, then Dense layers of
2048 units) with `run.RunWriter` (no Keras, no training), B being A plus
noise with the units of one Dense layer permuted, then diffs them in a fresh
process and prints the wall times, the peak of Python/numpy allocations
(tracemalloc) and the peak resident memory (which also counts the pages of
the memory-mapped tensor files while they are read), each relative to the
bytes of one run.

Usage:

    .venv/bin/python benchmarks/bench_diff.py [--params 100_000_000] [--repeats 3]
    .venv/bin/python benchmarks/bench_diff.py --case unsettled [--repeats 5]

It prints, side by side from one process and interleaved: one plain numpy pass over
the same memory-mapped tensors (the norms, dot products and squared differences a
diff needs, in float64 chunks), `diff_runs(match=False)` and `diff_runs(match=True)`.

`--case unsettled`: two runs of six Dense(2048) layers (25M parameters), B = A +
noise of half the weights' scale, where no bound from leading rows settles every
assignment. Beside `diff_runs(match=True)` it times the floor of any exact
matching: per layer one float32 units x units Gram product of the memory-mapped
kernels and one `scipy.optimize.linear_sum_assignment`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def architecture(params: int, case: str = "default"
                 ) -> list[tuple[str, str, dict[str, tuple[int, ...]]]]:
    """(layer, class, {weight: shape}) for about `params` parameters (`case` "unsettled":
    six Dense(2048) layers whatever `params`)."""
    if case == "unsettled":
        return [(f"dense{i + 1}", "Dense", {"kernel": (2048, 2048), "bias": (2048,)})
                for i in range(6)]
    layers = []
    chans = [3, 64, 128, 256, 512]
    for i in range(4):
        layers.append((f"conv{i + 1}", "Conv2D", {
            "kernel": (3, 3, chans[i], chans[i + 1]), "bias": (chans[i + 1],)}))
    used = sum(math.prod(s) for _, _, w in layers for s in w.values())
    fan_in, i = 512 * 4 * 4, 0
    while used < params:
        units = 2048
        layers.append((f"dense{i + 1}", "Dense", {"kernel": (fan_in, units), "bias": (units,)}))
        used += fan_in * units + units
        fan_in, i = units, i + 1
    return layers


def write_runs(root: str, params: int, case: str = "default", noise: float | None = None
               ) -> tuple[str, str, int]:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from keras_weightwatch.capture import LayerInfo, ModelInfo, Snapshot, WeightSpec
    from keras_weightwatch.run import RunWriter

    arch = architecture(params, case)
    if noise is None:
        noise = 0.5 if case == "unsettled" else 0.05
    scale = np.float32(noise)
    specs = tuple(
        WeightSpec(key=f"{name}/{w}", path=f"model/{name}/{w}", layer=name, shape=shape,
                   dtype="float32", trainable=True)
        for name, _, weights in arch for w, shape in weights.items()
    )
    layers = tuple(
        LayerInfo(name, cls, sum(math.prod(s) for s in w.values()), 0, 0) for name, cls, w in arch
    )
    info = ModelInfo("model", "Sequential", layers, specs)
    rng = np.random.default_rng(0)
    # B holds dense2's units in another order (kernel columns, bias, and dense3's input rows):
    # the same network, which the matching should recognise.
    perm = rng.permutation(2048)
    paths = [os.path.join(root, "a"), os.path.join(root, "b")]
    writers = [RunWriter.open(p, info, settings={}, versions={}, durable=False) for p in paths]
    records: list[dict] = [{}, {}]
    try:
        # One tensor at a time, so writing the runs needs little memory either.
        for spec in specs:
            a = rng.standard_normal(spec.shape, dtype=np.float32)
            b = a + scale * rng.standard_normal(spec.shape, dtype=np.float32)
            if case == "unsettled":
                pass
            elif spec.key.startswith("dense2/"):
                b = np.ascontiguousarray(b[..., perm])
            elif spec.key == "dense3/kernel":
                b = np.ascontiguousarray(b[perm])
            for writer, arr, recs in zip(writers, (a, b), records):
                snap = Snapshot(step=0, label="epoch", epoch=0, arrays={spec.key: arr}, logs={})
                recs.update(store_one(writer, snap, spec))
        for writer, recs in zip(writers, records):
            snap = Snapshot(step=0, label="epoch", epoch=0, arrays={}, logs={"loss": 1.0})
            writer.commit_snapshot(snap, recs)
    finally:
        for writer in writers:
            writer.close()
    total = sum(s.size for s in specs)
    return paths[0], paths[1], total


def store_one(writer, snap, spec) -> dict:
    """Store one tensor of a snapshot (RunWriter.store_tensors stores every spec at once)."""
    all_specs = writer.specs
    writer.specs = (spec,)
    try:
        return writer.store_tensors(snap)
    finally:
        writer.specs = all_specs


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM; ru_maxrss survives exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def baseline(a: str, b: str) -> None:
    """One plain numpy pass over the same memory-mapped tensors: for each pair, the norms,
    the dot product and the squared difference, in float64 chunks of 1M values."""
    from keras_weightwatch.run import load_run
    from keras_weightwatch.run.reader import tensor_name

    run_a, run_b = load_run(a), load_run(b)
    snap_a, snap_b = run_a.snapshot("last"), run_b.snapshot("last")
    for key, rec in snap_a.tensors.items():
        xa = np.load(run_a.storage.where(tensor_name(rec)), mmap_mode="r").reshape(-1)
        rec_b = snap_b.tensors[key]
        xb = np.load(run_b.storage.where(tensor_name(rec_b)), mmap_mode="r").reshape(-1)
        for i in range(0, xa.size, 1 << 20):
            fa = np.asarray(xa[i:i + (1 << 20)], np.float64)
            fb = np.asarray(xb[i:i + (1 << 20)], np.float64)
            d = fb - fa
            np.einsum("i,i->", fa, fa), np.einsum("i,i->", fb, fb)
            np.einsum("i,i->", fa, fb), np.einsum("i,i->", d, d)


def floor(a: str, b: str) -> None:
    """What any exact matching must do: per Dense kernel, one float32 units x units Gram
    product of the memory-mapped kernels and one linear_sum_assignment."""
    from scipy.optimize import linear_sum_assignment

    from keras_weightwatch.run import load_run
    from keras_weightwatch.run.reader import tensor_name

    run_a, run_b = load_run(a), load_run(b)
    snap_a, snap_b = run_a.snapshot("last"), run_b.snapshot("last")
    for key, rec in snap_a.tensors.items():
        if not key.endswith("/kernel"):
            continue
        xa = np.load(run_a.storage.where(tensor_name(rec)), mmap_mode="r")
        xb = np.load(run_b.storage.where(tensor_name(snap_b.tensors[key])), mmap_mode="r")
        linear_sum_assignment(xa.T @ xb, maximize=True)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(a: str, b: str, repeats: int, case: str = "default") -> dict:
    """Run in a fresh process: the baseline and diff_runs with and without matching,
    interleaved `repeats` times (medians), after the memory of one matched diff."""
    import statistics
    import tracemalloc

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import scipy.optimize  # noqa: F401  (imported before the baseline is taken)

    from keras_weightwatch import diff_runs

    kinds = {
        "numpy pass": lambda: baseline(a, b),
        "match=False": lambda: diff_runs(a, b, match=False),
        "match=False, verify=False": lambda: diff_runs(a, b, match=False, verify=False),
        "match=True": lambda: diff_runs(a, b, match=True),
    }
    if case == "unsettled":
        kinds = {"floor": lambda: floor(a, b), "match=True": kinds["match=True"]}
    # Memory first, in the fresh process: one matched diff.
    rss0 = _peak_rss()
    tracemalloc.start()
    result = diff_runs(a, b, match=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1 = _peak_rss()
    baseline(a, b)  # the files' pages into the cache for every kind alike
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for k, fn in kinds.items():
            times[k].append(_timed(fn))
    matched = [f"{t.name} ({t.units_moved} units, cosine {t.cosine:.4f}, matched "
               f"{t.matched_cosine:.4f})" for t in result.tensors if t.units_moved]
    fixed = [t.name for t in result.tensors if t.units_fixed]
    return {"median": {k: statistics.median(v) for k, v in times.items()}, "times": times,
            "traced_peak": peak, "rss_before": rss0, "rss_peak": rss1,
            "tensors": len(result.tensors), "moved": matched, "fixed": fixed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=100_000_000)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (medians)")
    p.add_argument("--dir", default=None, help="where to write the runs (default: a temp dir)")
    p.add_argument("--case", choices=("default", "unsettled"), default="default",
                   help="unsettled: six Dense(2048) layers, B = A + noise of half the "
                        "weights' scale, timed against the Gram + assignment floor")
    p.add_argument("--noise", type=float, default=None,
                   help="B = A + noise x N(0, 1) (A is N(0, 1)); default 0.05, 0.5 for unsettled")
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    p.add_argument("--measure", nargs=2, metavar=("A", "B"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        run_a, run_b = args.measure
        print(json.dumps(measure(run_a, run_b, repeats=args.repeats, case=args.case)))
        return
    from machine import machine

    print(f"machine: {machine()}", flush=True)
    root = args.dir or tempfile.mkdtemp(prefix="bench-diff-")
    try:
        t0 = time.perf_counter()
        a, b, total = write_runs(root, args.params, args.case, args.noise)
        t_write = time.perf_counter() - t0
        tensor_dir = os.path.join(a, "tensors")
        run_bytes = sum(os.path.getsize(os.path.join(tensor_dir, f))
                        for f in os.listdir(tensor_dir))
        cmd = [sys.executable, __file__, "--measure", a, b, "--repeats", str(args.repeats),
               "--case", args.case]
        m = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        if args.case == "unsettled":
            report_floor(m, total, args.repeats, args.noise or 0.5)
        else:
            report(m, total, run_bytes, t_write, args.repeats)
        if args.markdown:
            markdown(m, total, args.case, args.noise or 0.5)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


def report_floor(m: dict, total: int, repeats: int, noise: float) -> None:
    med = m["median"]
    print(f"two runs of {total:,} float32 parameters (six Dense(2048), B = A + {noise:g} x "
          f"the weights' scale of noise); medians of {repeats} interleaved repetitions")
    print(f"  floor (per kernel: float32 Gram + linear_sum_assignment): {med['floor']:.3f} s")
    print(f"  diff_runs(a, b, match=True): {med['match=True']:.3f} s = "
          f"{med['match=True'] / med['floor']:.2f} x the floor (target <= 1.5)")


def markdown(m: dict, total: int, case: str, noise: float) -> None:
    """The docs' table of this run (Comparing runs; benchmarks/README.md)."""
    from machine import machine
    from tables import print_markdown

    med = m["median"]
    if case == "unsettled":
        floor, match = med["floor"], med["match=True"]
        print_markdown(
            ["two runs of six Dense(2048), B = A + noise", "floor (Gram + assignment)",
             "`diff_runs(a, b)`", "ratio"],
            [(f"{total / 1e6:.1f}M parameters, noise {noise:g} x the weights' scale",
              f"{floor:.3f} s", f"{match:.3f} s", f"**{match / floor:.2f} x** the floor")],
            note=f" on {machine()}")
        return
    base, plain, match = med["numpy pass"], med["match=False"], med["match=True"]
    quick = med["match=False, verify=False"]
    size = f"{total / 1e6:.1f}M parameters"
    print_markdown(["", size, "ratio"], [
        ("one plain numpy pass over the same memory-mapped tensors (norms, dot, squared "
         "difference; float64 chunks)", f"{base:.3f} s", "1"),
        ("`diff_runs(a, b, match=False, verify=False)`", f"{quick:.3f} s",
         f"{quick / base:.2f} x the numpy pass"),
        ("`diff_runs(a, b, match=False)` (every file's BLAKE3 checked first)", f"{plain:.3f} s",
         f"{plain / base:.2f} x the numpy pass"),
        ("`diff_runs(a, b)` (matching the hidden layers; the output layer kept in order)",
         f"{match:.3f} s", f"**{match / plain:.2f} x** `match=False`"),
    ], note=f" on {machine()}")


def report(m: dict, total: int, run_bytes: int, t_write: float, repeats: int) -> None:
    mib = 1 << 20
    med = m["median"]
    base, plain, match = med["numpy pass"], med["match=False"], med["match=True"]
    print(f"two runs of {total:,} float32 parameters ({run_bytes / mib:,.0f} MiB each), "
          f"written in {t_write:.1f} s; medians of {repeats} interleaved repetitions")
    print(f"  one plain numpy pass (norms, dot, diff; float64 chunks): {base:.3f} s")
    print(f"  diff_runs(a, b, match=False):                {plain:.3f} s = "
          f"{plain / base:.2f} x the numpy pass (target <= 2)")
    print(f"  diff_runs(a, b, match=False, verify=False):  "
          f"{med['match=False, verify=False']:.3f} s = "
          f"{med['match=False, verify=False'] / base:.2f} x the numpy pass")
    print(f"diff_runs(a, b, match=True): {match:.3f} s for {m['tensors']} tensors = "
          f"{match / plain:.2f} x match=False (target <= 3)")
    print(f"  tracemalloc peak   {m['traced_peak'] / mib:8.1f} MiB = "
          f"{m['traced_peak'] / run_bytes:.3f} x one run")
    print(f"  peak RSS           {m['rss_peak'] / mib:8.1f} MiB = "
          f"{m['rss_peak'] / run_bytes:.3f} x one run (whole process, with mapped pages; "
          f"{m['rss_before'] / mib:.0f} MiB after imports)")
    print(f"  units moved by the matching in: {', '.join(m['moved']) or '(none)'}")
    print(f"  units kept in order (model outputs): {', '.join(m['fixed']) or '(none)'}")


if __name__ == "__main__":
    main()
