"""What WeightWatch costs per epoch next to keras.callbacks.TensorBoard on the reference CNN.

The cost measure (issue 13): cost of a callback per epoch = wall time inside its hooks on
the training thread (`on_train_end`'s wait for the last snapshot included) + CPU time
(user + sys) of every thread it started, counted until `on_train_end` begins, divided by
the epochs; medians of interleaved repetitions. Target: WeightWatch with every view on
(snapshots every epoch, statistics, histograms, kernel grids, the top-k feature table,
responses of 4 sample images) costs at most 0.08 of
`keras.callbacks.TensorBoard(histogram_freq=1, write_images=True)`, measured the same way
in the same process. The ratio of fit-time differences is printed beside it, labelled: on
2 cores it hides most of a worker's CPU.

The reference CNN: Conv32-Pool-Conv64-Flatten-Dense256-Dense10 on 28x28x1 (2.0M
parameters), 4 epochs of 6,000 images, batch 128. The images are scikit-learn's digits
(8x8, shipped with the package, no download) scaled up 3x and padded to 28x28, repeated
to 6,000.

Three kinds of fit alternate, `--repeats` times each, each on a freshly built model with
the same seed (so each pays the same tracing): `alone`, `tensorboard`, `weightwatch`.

Run:  .venv/bin/python benchmarks/bench_overhead.py        (about 3 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # before Keras is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
from common import WORKER_TIMES, CostMeter, TimedWeightWatch, machine, med, time_worker  # noqa: E402
from tables import print_markdown  # noqa: E402

from keras_weightwatch.run import storage  # noqa: E402


def digits(n: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    img = d.images.astype("float32") / 16.0  # (1797, 8, 8)
    img = np.kron(img, np.ones((1, 3, 3), "float32"))  # 24 x 24
    img = np.pad(img, ((0, 0), (2, 2), (2, 2)))[..., None]  # 28 x 28 x 1
    reps = -(-n // len(img))
    return np.tile(img, (reps, 1, 1, 1))[:n], np.tile(d.target, reps)[:n].astype("int32")


def build() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 3, activation="relu", name="conv2"),
            keras.layers.Flatten(),
            keras.layers.Dense(256, activation="relu", name="dense"),
            keras.layers.Dense(10, name="logits"),
        ]
    )
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--markdown", action="store_true", help="also print the docs' table")
    p.add_argument("--health", action="store_true",
                   help="instead: WeightWatch with the health rules (the default) against "
                        "health=None, interleaved, and the ratio of their costs")
    p.add_argument("--batch-hook", type=int, default=1,
                   help="also fit this many times with batch_freq set but never due, for the "
                        "cost of WeightWatch's batch hook (0: skip)")
    p.add_argument("--buffered-writes", action="store_true",
                   help="write every tensor file through the page cache, as before large "
                        "ones went past it (O_DIRECT), for comparison")
    args = p.parse_args(argv)
    if args.buffered_writes:
        storage._O_DIRECT = 0
        print("tensor files written through the page cache (--buffered-writes)")

    time_worker()
    x, y = digits(args.images)
    samples = x[:4]
    print(f"machine: {machine()}")
    params = build().count_params()
    print(f"model: Conv32-Pool-Conv64-Flatten-Dense256-Dense10, {params:,} parameters; "
          f"{args.epochs} epochs of {args.images} images, batch {args.batch}; "
          f"{args.repeats} repeats, alternating")
    sys.stdout.flush()
    root = tempfile.mkdtemp(prefix="ww-bench-overhead-")

    def callbacks(kind: str, tag: str):
        if kind == "tensorboard":
            return [keras.callbacks.TensorBoard(os.path.join(root, f"tb-{tag}"),
                                                histogram_freq=1, write_images=True)]
        if kind in ("weightwatch", "batch_hook", "no_health"):
            return [TimedWeightWatch(
                os.path.join(root, f"ww-{kind}-{tag}"),
                health=None if kind == "no_health" else "warn",
                batch_freq=10**9 if kind == "batch_hook" else None,
                histograms=True,
                kernel_images=True,
                feature_layer="dense",
                top_k=5,
                sample_images=samples,
            )]
        return []

    def fit(kind: str, tag: str, epochs: int):
        model = build()
        cbs = callbacks(kind, tag)
        meters = [CostMeter(cb) for cb in cbs]
        WORKER_TIMES.clear()
        t0 = time.perf_counter()
        model.fit(x, y, epochs=epochs, batch_size=args.batch, verbose=0, callbacks=cbs)
        return time.perf_counter() - t0, cbs, meters

    for kind in ("alone", "tensorboard", "weightwatch"):  # warm up: imports, first traces
        fit(kind, "warmup", 1)
    if args.health:
        health_cost(args, fit)
        shutil.rmtree(root, ignore_errors=True)
        return 0

    times: dict[str, list[float]] = {"alone": [], "tensorboard": [], "weightwatch": []}
    costs: dict[str, list[tuple[float, float]]] = {"tensorboard": [], "weightwatch": []}
    threads: dict[str, set[str]] = {"tensorboard": set(), "weightwatch": set()}
    hooks: dict[str, list[float]] = {}
    for r in range(args.repeats):
        order = ["alone", "tensorboard", "weightwatch"]
        order = order[r % 3:] + order[: r % 3]  # rotate, so no kind always runs first
        for kind in order:
            seconds, cbs, meters = fit(kind, str(r), args.epochs)
            times[kind].append(seconds)
            line = ""
            if meters:
                m = meters[0]
                costs[kind].append((m.hooks / args.epochs, m.thread_cpu / args.epochs))
                threads[kind] |= set(m.thread_names.values())
                line = (f", cost {m.total / args.epochs * 1e3:6.1f} ms per epoch (hooks "
                        f"{m.hooks / args.epochs * 1e3:.1f} + threads "
                        f"{m.thread_cpu / args.epochs * 1e3:.1f})")
            if kind == "weightwatch":
                for name, ts in cbs[0].hook_times.items():
                    hooks.setdefault(name, []).extend(ts)
                hooks.setdefault("worker", []).extend(WORKER_TIMES)
            print(f"  repeat {r} {kind:12s} fit {seconds:6.2f} s{line}")
            sys.stdout.flush()
    report(args, times, costs, threads, hooks)
    batch_hook(args, fit)
    shutil.rmtree(root, ignore_errors=True)
    return 0


def health_cost(args, fit) -> None:
    """The cost measure of WeightWatch (every view) with the health rules and without them
    (`health=None`), interleaved; the ratio of the medians."""
    costs: dict[str, list[float]] = {"no_health": [], "weightwatch": []}
    for r in range(args.repeats):
        for kind in (("no_health", "weightwatch") if r % 2 == 0 else ("weightwatch", "no_health")):
            seconds, _, (m,) = fit(kind, f"h{r}", args.epochs)
            costs[kind].append(m.total / args.epochs)
            print(f"  repeat {r} {kind:12s} fit {seconds:6.2f} s, cost "
                  f"{m.total / args.epochs * 1e3:6.1f} ms per epoch")
            sys.stdout.flush()
    off, on = med(costs["no_health"]), med(costs["weightwatch"])
    print(f"\ncost per epoch (hooks' wall time + CPU of the threads each started; median of "
          f"{args.repeats}): health=None {off * 1e3:.1f} ms, health='warn' {on * 1e3:.1f} ms: "
          f"ratio {on / off:.3f}")
    if args.markdown:
        print("\n| WeightWatch (every view) | cost per epoch | ratio |\n|---|---:|---:|")
        print(f"| health=None | {off * 1e3:.1f} ms | 1 |")
        print(f"| health='warn' (the default) | {on * 1e3:.1f} ms | {on / off:.3f} |")


def batch_hook(args, fit) -> None:
    """With `batch_freq` on but no snapshot due: the hook's time per batch, and the fit."""
    per_batch, fits = [], []
    for r in range(args.batch_hook):
        seconds, _, (m,) = fit("batch_hook", f"b{r}", args.epochs)
        per_batch.append(m.hook_wall["on_train_batch_end"] / m.hook_calls["on_train_batch_end"])
        fits.append(seconds)
    if per_batch:
        print(f"batch_freq on, no snapshot due: on_train_batch_end {med(per_batch) * 1e6:.1f} us "
              f"per batch (median of {len(per_batch)} fits); fit {med(fits):.2f} s (Keras then "
              "waits for each batch's logs)")


def report(args, times, costs, threads, hooks) -> None:
    epochs = args.epochs
    alone, tb, ww = (med(times[k]) for k in ("alone", "tensorboard", "weightwatch"))
    tb_added = (tb - alone) / epochs
    ww_added = (ww - alone) / epochs
    tb_cost = med([h + c for h, c in costs["tensorboard"]])
    ww_cost = med([h + c for h, c in costs["weightwatch"]])
    print()
    print(f"cost per epoch (hooks' wall time + CPU of the threads each started; median of "
          f"{args.repeats}):")
    for kind, cost in (("tensorboard", tb_cost), ("weightwatch", ww_cost)):
        h = med([h for h, _ in costs[kind]])
        c = med([c for _, c in costs[kind]])
        started = ", ".join(sorted(threads[kind])) or "none"
        print(f"  {kind:12s} {cost * 1e3:7.1f} ms  (hooks {h * 1e3:.1f} ms, threads "
              f"{c * 1e3:.1f} ms; threads started: {started})")
    print(f"fit alone        {alone:6.2f} s (median of {args.repeats})")
    print(f"fit + TensorBoard(histogram_freq=1, write_images=True) {tb:6.2f} s: "
          f"adds {tb_added * 1e3:7.1f} ms per epoch")
    print(f"fit + WeightWatch(every view)                          {ww:6.2f} s: "
          f"adds {ww_added * 1e3:7.1f} ms per epoch")
    print("training-thread time inside WeightWatch's hooks (median per call):")
    per_epoch_hooks = 0.0
    for name in ("on_train_begin", "on_epoch_begin", "on_epoch_end", "on_train_end"):
        ts = hooks.get(name, [])
        calls = len(ts) / args.repeats
        per_epoch_hooks += med(ts) * calls / epochs
        print(f"  {name:16s} {med(ts) * 1e3:8.1f} ms  (max {max(ts) * 1e3:7.1f} ms, "
              f"{calls:.0f} per fit)")
    print(f"  total per epoch  {per_epoch_hooks * 1e3:8.1f} ms")
    wt = hooks.get("worker", [])
    print(f"worker per snapshot: median {med(wt) * 1e3:.1f} ms wall (max {max(wt) * 1e3:.1f} ms, "
          f"n={len(wt)}), on the background thread")
    print()
    print(f"RATIO cost per epoch, WeightWatch / TensorBoard: {ww_cost / tb_cost:.3f}"
          "  (the cost measure; target <= 0.08)")
    print(f"RATIO WeightWatch added / TensorBoard added (per epoch): {ww_added / tb_added:.3f}"
          "  (fit-time differences)")
    if args.markdown:
        ww_hooks = med([h for h, _ in costs["weightwatch"]])
        ww_threads = med([c for _, c in costs["weightwatch"]])
        print_markdown(["", "measured", "target"], [
            ("2.0M-parameter CNN, every view on, 4 sample images: **cost per epoch** (hooks' "
             "wall time + CPU of the threads each callback started), WeightWatch / "
             "`TensorBoard(histogram_freq=1, write_images=True)`",
             f"{ww_cost * 1e3:.1f} / {tb_cost * 1e3:.1f} ms = **{ww_cost / tb_cost:.3f}** "
             f"(hooks {ww_hooks * 1e3:.1f} + worker CPU {ww_threads * 1e3:.1f})", "<= 0.08"),
            ("the same run, fit-time differences (they hide the worker's CPU)",
             f"{ww_added * 1e3:.1f} / {tb_added * 1e3:.1f} ms per epoch = "
             f"{ww_added / tb_added:.3f} (fit alone {alone:.2f} s)", ""),
        ], note=f" on {machine()}")


if __name__ == "__main__":
    raise SystemExit(main())
