"""Fine-tuning with LoRA: what did the fine-tune change, layer by layer?

A small CNN is trained on digits 0-4 with WeightWatch watching. LoRA is then enabled
on its convolution and its Dense head (`layer.enable_lora(rank)`: the base kernels are
frozen, two small adapters A and B train) and the model is fine-tuned on digits 5-9,
`fit(initial_epoch=...)` into the same log directory: one run, the adapters joining it
at the step the fine-tune starts.

Everything printed below is read from the run directory:

- the effective kernels: each adapted layer computes with `base + (alpha/rank) A @ B`,
  which `run.weights(step, effective=True)` gives (it equals `layer.kernel`), while the
  stored base kernel is one tensor file across all fine-tune snapshots;
- the change since the pre-trained weights, per adapted layer: the relative change of
  the effective kernel, and the size of the adapters' update `|(alpha/rank) A B| / |base|`.

    python examples/lora_fine_tune.py [--quick] [--stuck] [--logdir DIR]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_weightwatch import WeightWatch, load_run  # noqa: E402

ADAPTED = ("conv", "head")
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def load_data(n: int):
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))[:n]
    return (d.images[order] / 16.0).astype("float32")[..., None], d.target[order].astype("int32")


def build_model():
    layers = keras.layers
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(8, 3, padding="same", activation="relu", name="conv"),
        layers.Flatten(name="flat"),
        layers.Dense(10, name="head"),
    ], name="digits")


def relative(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a64 - b64) / np.linalg.norm(b64))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default="runs/lora_fine_tune")
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("WEIGHTWATCH_EXAMPLES_QUICK") == "1")
    parser.add_argument("--stuck", action="store_true",
                        help="keep the head's adapter B from training (as a wrong `trainable` "
                             "flag would): WeightWatch warns that it is not training")
    args = parser.parse_args(argv)
    epochs, n = (2, 500) if args.quick else (6, 1797)

    x, y = load_data(n)
    old, new = y < 5, y >= 5
    keras.utils.set_random_seed(0)
    model = build_model()
    model.compile(keras.optimizers.Adam(0.003), LOSS)
    model.fit(x[old], y[old], epochs=epochs, verbose=0, callbacks=[WeightWatch(args.logdir)])
    pretrained = load_run(args.logdir).snapshots[-1].step

    for name in ADAPTED:
        model.get_layer(name).enable_lora(4)
    if args.stuck:
        model.get_layer("head").lora_kernel_b.trainable = False
    model.compile(keras.optimizers.Adam(0.02), LOSS)
    model.fit(x[new], y[new], initial_epoch=epochs, epochs=2 * epochs, verbose=0,
              callbacks=[WeightWatch(args.logdir)])

    run = load_run(args.logdir)
    before = run.weights(pretrained, effective=True)
    after = run.weights("last", effective=True)
    stored = run.weights("last")
    print(f"one run: {run.path}, steps {run.steps[0]}..{run.steps[-1]}, LoRA from step "
          f"{pretrained + 1} on ({len(run.derived)} adapted kernels)")
    for d in run.derived:
        layer = model.get_layer(d.layer.rpartition("/")[2])
        same = np.allclose(after[d.key], np.asarray(layer.kernel), atol=1e-6)
        frozen = {s.tensors[d.key].digest for s in run.snapshots if s.step > pretrained}
        update = run.snapshot("last").stats[d.key].get("lora_update", float("nan"))
        print(f"{d.key:14s} effective kernel moved {relative(after[d.key], before[d.key]):6.1%} "
              f"since step {pretrained} (adapters' update {update:.3f} of the base); "
              f"base stored as {len(frozen)} file(s); effective == layer.kernel: {same}; "
              f"base unchanged: {np.array_equal(stored[d.key], before[d.key])}")


if __name__ == "__main__":
    main()
