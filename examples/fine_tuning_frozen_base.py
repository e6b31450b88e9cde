"""Fine-tuning with a frozen base: the frozen weights are stored once and never drift.

A base network (Conv - BatchNorm - Conv) is trained on digits 0-4; then it is
frozen (`base.trainable = False`, which also keeps BatchNorm in inference
mode) and a new head is trained on digits 5-9 with WeightWatch watching.

Everything printed below is read from the run directory:

- dedupe: each frozen tensor has one SHA-256 across all snapshots, so it is one
  file on disk, while each head tensor gets a new file per epoch; the run's
  tensor bytes are compared with what storing every snapshot in full would take;
- drift: the frozen tensors at the last epoch equal the initial ones bit for
  bit (relative change 0), the head's do not.

    python examples/fine_tuning_frozen_base.py [--quick] [--logdir DIR]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_weightwatch import WeightWatch, load_run  # noqa: E402


def load_data(n: int):
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))[:n]
    return (d.images[order] / 16.0).astype("float32")[..., None], d.target[order].astype("int32")


def build_base():
    layers = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(8, 3, padding="same", activation="relu", name="base_conv1"),
        layers.BatchNormalization(name="base_bn"),
        layers.Conv2D(8, 3, padding="same", activation="relu", name="base_conv2"),
        layers.GlobalAveragePooling2D(name="base_pool"),
    ], name="base")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default="runs/fine_tuning_frozen_base")
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("WEIGHTWATCH_EXAMPLES_QUICK") == "1")
    args = parser.parse_args(argv)
    epochs, n = (3, 500) if args.quick else (8, 1797)

    x, y = load_data(n)
    old, new = y < 5, y >= 5
    keras.utils.set_random_seed(0)

    # 1. Pre-train the base (with a throw-away head) on digits 0-4.
    base = build_base()
    pretrain = keras.Sequential([base, keras.layers.Dense(5, activation="softmax")])
    pretrain.compile("adam", "sparse_categorical_crossentropy")
    pretrain.fit(x[old], y[old], epochs=epochs, batch_size=32, verbose=0)

    # 2. Freeze it and fine-tune a new head on digits 5-9, watched.
    base.trainable = False
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        base,
        keras.layers.Dense(16, activation="relu", name="head_hidden"),
        keras.layers.Dense(5, activation="softmax", name="head_out"),
    ], name="fine_tuned")
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    watch = WeightWatch(args.logdir, if_exists="new")
    model.fit(x[new], y[new] - 5, epochs=epochs, batch_size=32, verbose=0, callbacks=[watch])

    # 3. What the run shows.
    run = load_run(watch.run_dir)
    specs = {s.key: s for s in run.specs}
    print(f"run: {run.path}; snapshots: {', '.join(s.name for s in run.snapshots)}")
    print(f"\n{'weight':<28} {'trainable':>9} {'files':>5} {'rel change':>11}  frozen?")
    initial, last = run.weights("initial"), run.weights("last")
    frozen_ok = True
    for key, spec in specs.items():
        files = {snap.tensors[key].sha256 for snap in run.snapshots}
        a, b = np.asarray(initial[key]), np.asarray(last[key])
        norm, change = float(np.linalg.norm(a)), float(np.linalg.norm(b - a))
        rel = f"{change / norm:.4f} " if norm else f"{change:.4f}*"  # *: from all zeros
        frozen = key.startswith("base/")
        if frozen and (len(files) != 1 or not np.array_equal(a, b)):
            frozen_ok = False
        print(f"{key:<28} {'yes' if spec.trainable else 'no':>9} {len(files):>5} {rel:>11}  "
              f"{'frozen' if frozen else ''}".rstrip())
    print("(files: distinct tensor files across all snapshots; rel change: ||W_last - W_initial|| /"
          " ||W_initial||, * = absolute, the initial weights being all zero)")

    stored = {rec.sha256: rec.bytes for snap in run.snapshots for rec in snap.tensors.values()}
    full = sum(rec.bytes for snap in run.snapshots for rec in snap.tensors.values())
    on_disk = sum(stored.values())
    print(f"\ntensor files: {len(stored)} ({on_disk:,} bytes); every snapshot stored in full "
          f"would take {full:,} bytes ({full / on_disk:.1f}x)")
    print("frozen base: stored once, zero drift" if frozen_ok
          else "frozen base: CHANGED (this should not happen)")


if __name__ == "__main__":
    main()
