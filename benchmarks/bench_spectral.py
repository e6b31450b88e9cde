"""Time of the spectral metrics vs weightwatcher's analyze() and vs the eigenvalues alone.

For each model, side by side in one run (medians of `--repeats` interleaved repetitions):

- `weightwatcher.WeightWatcher(model=m).analyze(conv2d_norm=False)` (weightwatcher's
  defaults except the sqrt(1/2) scale of Conv2D matrices, so that every number can be
  compared; the scale does not change its cost);
- ours: `keras_weightwatch.spectral.tensor_spectral` on every Dense and Conv2D kernel, from
  the arrays `get_weights()` returns;
- the floor: the eigenvalues alone, `numpy.linalg.eigvalsh` of the float64 Gram matrices
  (the smaller of WᵀW and WWᵀ of each matrix, each kernel position of a convolution).

The models: `--depth` Dense layers of `--width` units on `--width` inputs, and the reference
CNN (Conv32-Pool-Conv64-Flatten-Dense256-Dense10 on 28x28x1). Then, numpy only, ours and the
floor for `--big-depth` kernels of `--big-width` x `--big-width` (6 x 4096 x 4096 = 100.7M
parameters by default, the model of bench_100m.py); weightwatcher is not run on those (about a
minute on 2 cores) unless `--big-ww` is given.

Times are CPU seconds of the process (all its threads), medians, with one BLAS/LAPACK thread
by default (`--threads`): on a shared machine they measure the work rather than the wait for
a core. Wall times are printed beside them; the ratios are of CPU times.

Usage:

    .venv/bin/python benchmarks/bench_spectral.py [--width 1024] [--depth 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
import warnings

# One BLAS/LAPACK thread for numpy, scipy and weightwatcher alike (before numpy is imported),
# so that CPU times compare equal work on a shared machine; --threads changes it.
_threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv else "1"
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _threads)

import numpy as np  # noqa: E402

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from keras_weightwatch.spectral import kernel_matrices, tensor_spectral  # noqa: E402

COLUMNS = ("spectral_norm", "stable_rank", "log_norm", "alpha", "alpha_weighted")


def mlp(width: int, depth: int):
    import keras

    return keras.Sequential([keras.Input((width,))]
                            + [keras.layers.Dense(width) for _ in range(depth)])


def reference_cnn():
    import keras

    layers = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)), layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(),
        layers.Conv2D(64, 3, activation="relu"), layers.Flatten(),
        layers.Dense(256, activation="relu"), layers.Dense(10, activation="softmax")])


def kernels_of(model) -> list[tuple[str, str, np.ndarray]]:
    """(layer name, class name, kernel) of every layer with a kernel, as get_weights() gives."""
    return [(layer.name, type(layer).__name__, layer.get_weights()[0])
            for layer in model.layers if layer.weights]


def ours(kernels):
    return {name: tensor_spectral(k, cls) for name, cls, k in kernels}


def floor(kernels) -> None:
    for _, cls, k in kernels:
        for w in np.asarray(kernel_matrices(k, cls), dtype=np.float64):
            if w.shape[0] < w.shape[1]:
                w = w.T
            np.linalg.eigvalsh(w.T @ w)


def weightwatcher(model):
    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=model).analyze(conv2d_norm=False)
    return {row["name"]: row for _, row in details.iterrows()}


def agreement(mine, theirs) -> tuple[dict[str, float], int]:
    """The largest relative difference of each column over the layers both report."""
    worst = dict.fromkeys(COLUMNS, 0.0)
    fitted = 0
    for name, m in mine.items():
        row = theirs.get(name)
        if row is None:
            continue
        values = {"spectral_norm": m.spectral_norm, "stable_rank": m.stable_rank,
                  "log_norm": m.log_norm, "alpha": m.alpha, "alpha_weighted": m.alpha_weighted}
        fitted += m.reason is None
        for col, v in values.items():
            if math.isfinite(v):
                worst[col] = max(worst[col], abs(v - row[col]) / abs(row[col]))
    return worst, fitted


def timed(fn, *args):
    """(CPU seconds of this process, wall seconds, result) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    return time.process_time() - c0, time.perf_counter() - t0, out


def line(label: str, cpu: list[float], wall: list[float], extra: str = "") -> float:
    c, w = statistics.median(cpu), statistics.median(wall)
    print(f"  {label:<35}{c * 1e3:10.2f} ms CPU ({w * 1e3:.0f} ms wall){extra}")
    return c


def cells(label: str, t_ww: float | None, t_ours: float, t_floor: float) -> tuple[str, ...]:
    """One row of the docs' table (docs/SPECTRAL.md, Cost): CPU times and their ratios."""
    def ms(t: float) -> str:
        return f"{t * 1e3:,.0f} ms" if t < 10 else f"{t:.1f} s"

    return (label, "not run" if t_ww is None else ms(t_ww), ms(t_ours), ms(t_floor),
            "" if t_ww is None else f"**{t_ww / t_ours:.2f}**", f"**{t_ours / t_floor:.2f}**")


def compare(label: str, model, repeats: int) -> tuple[str, ...]:
    kernels = kernels_of(model)
    params = sum(k.size for _, _, k in kernels)
    shapes = ", ".join(f"{cls} {k.shape}" for _, cls, k in kernels)
    print(f"\n{label}: {len(kernels)} kernels, {params:,} parameters ({shapes})")
    runs = {"weightwatcher": weightwatcher, "ours": ours, "floor": floor}
    args = {"weightwatcher": model, "ours": kernels, "floor": kernels}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    results = {}
    # The first calls import TensorFlow and pandas and warm numpy's LAPACK: not timed.
    for name, fn in runs.items():
        fn(args[name])
    for _ in range(repeats):
        for name, fn in runs.items():
            c, w, results[name] = timed(fn, args[name])
            cpu[name].append(c)
            wall[name].append(w)
    t_ww = line("weightwatcher analyze()", cpu["weightwatcher"], wall["weightwatcher"])
    t_ours = line("ours (tensor_spectral per kernel)", cpu["ours"], wall["ours"])
    t_floor = line("floor (float64 Gram + eigvalsh)", cpu["floor"], wall["floor"])
    worst, fitted = agreement(results["ours"], results["weightwatcher"])
    print("  agreement with analyze(), largest relative difference: "
          + ", ".join(f"{c} {v:.1e}" for c, v in worst.items())
          + f" ({fitted} layers with alpha)")
    print(f"  RATIO weightwatcher / ours: {t_ww / t_ours:.2f}")
    print(f"  RATIO ours / floor: {t_ours / t_floor:.2f}")
    return cells(f"{label.split(' on ')[0]}: {shapes}", t_ww, t_ours, t_floor)


def big_set(width: int, depth: int, repeats: int, with_ww: bool) -> tuple[str, ...]:
    rng = np.random.default_rng(0)
    kernels = [(f"dense{i}", "Dense", rng.standard_normal((width, width), dtype=np.float32)
                * np.float32(1 / math.sqrt(width))) for i in range(depth)]
    params = sum(k.size for _, _, k in kernels)
    print(f"\nkernel set: {depth} x Dense ({width}, {width}), {params:,} parameters")
    cpu: dict[str, list[float]] = {"ours": [], "floor": []}
    wall: dict[str, list[float]] = {"ours": [], "floor": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("floor", floor)):
            c, w, _ = timed(fn, kernels)
            cpu[name].append(c)
            wall[name].append(w)
    per = statistics.median(cpu["ours"]) / depth
    t_ours = line("ours (tensor_spectral per kernel)", cpu["ours"], wall["ours"],
                  f", {per * 1e3:.0f} ms CPU per kernel")
    t_floor = line("floor (float64 Gram + eigvalsh)", cpu["floor"], wall["floor"])
    print(f"  RATIO ours / floor: {t_ours / t_floor:.2f}")
    if with_ww:
        model = mlp(width, depth)
        model.set_weights([k for _, _, k in kernels for k in (k, np.zeros(width, "float32"))])
        c, w, _ = timed(weightwatcher, model)
        t_ww = line("weightwatcher analyze() (once)", [c], [w])
        print(f"  RATIO weightwatcher / ours: {t_ww / t_ours:.2f}")
    return cells(f"{depth} x Dense ({width}, {width}), {params / 1e6:.1f}M parameters",
                 t_ww if with_ww else None, t_ours, t_floor)


class _NullEvents:
    def write(self, *args, **kwargs) -> None:
        pass


def worker_cost(label: str, model, repeats: int) -> None:
    """The spectral view's CPU per snapshot on the worker: measure + write (one BLAS thread)."""
    from keras_weightwatch.capture import Snapshot, capture_arrays, describe_model
    from keras_weightwatch.views import SpectralView

    info = describe_model(model)
    view = SpectralView(every=1)
    view.prepare(model, info)
    snap = Snapshot(step=0, label="epoch", epoch=0, logs={},
                    arrays=dict(zip([w.key for w in info.weights], capture_arrays(model))))
    cpu = []
    for _ in range(repeats + 1):  # the first builds threadpoolctl's controller: not counted
        c0 = time.thread_time()
        view.write(snap, {}, view.measure(snap), _NullEvents())
        cpu.append(time.thread_time() - c0)
    print(f"  WORKER spectral view, {label}: {statistics.median(cpu[1:]) * 1e3:.2f} ms CPU "
          "per snapshot (measure + write, worker thread)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--big-width", type=int, default=4096)
    p.add_argument("--big-depth", type=int, default=6)
    p.add_argument("--big-ww", action="store_true", help="also run weightwatcher on the big set")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", default="1",
                   help="BLAS/LAPACK threads (read before numpy is imported)")
    p.add_argument("--big-repeats", type=int, default=1)
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    args = p.parse_args()
    import keras
    import weightwatcher as ww
    from machine import machine

    print(f"machine: {machine()}, weightwatcher {ww.__version__}", flush=True)
    keras.utils.set_random_seed(0)
    rows = [compare(f"model: {args.depth} x Dense({args.width}) on {args.width} inputs",
                    mlp(args.width, args.depth), args.repeats),
            compare("reference CNN (Conv32-Pool-Conv64-Flatten-Dense256-Dense10 on 28x28x1)",
                    reference_cnn(), args.repeats)]
    worker_cost("reference CNN", reference_cnn(), args.repeats)
    rows.append(big_set(args.big_width, args.big_depth, args.big_repeats, args.big_ww))
    if args.markdown:
        from tables import print_markdown

        print_markdown(["kernels", "weightwatcher `analyze()`", "ours", "floor",
                        "weightwatcher / ours", "ours / floor"], rows,
                       note=f" on {machine()}, CPU time with one BLAS thread")


if __name__ == "__main__":
    main()
