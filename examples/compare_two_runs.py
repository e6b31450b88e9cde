"""Comparing runs: two seeds, and one network with its units shuffled.

Two runs that learned the same thing can hold it in another order: hidden unit 3
of one run may be hidden unit 11 of the other. A plain weight-by-weight
comparison then says "completely different". `diff_runs` also matches the units
of each Dense and convolution layer one-to-one (Hungarian assignment on their
cosine similarity) and reports the similarity after that matching.

This script trains a small CNN on scikit-learn's 8x8 digits (no download) three
times into `LOGDIR`:

- `seed1` and `seed2`: the same network from two random seeds;
- `seed1-shuffled`: seed1's trained network with the 8 kernels of `conv` and the
  32 units of `hidden` shuffled, and the next layer's inputs shuffled to match.
  It computes exactly the same function (the script checks the predictions), and
  WeightWatch records it with a one-epoch fit at learning rate 0.

It then prints, per layer, the raw cosine and the matched cosine of
seed1 vs seed1-shuffled (raw well below 1, matched 1: the same network) and of
seed1 vs seed2 (different networks; matching recovers part of the similarity),
and the text of `weightwatch diff`.

    python examples/compare_two_runs.py [--quick] [--logdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_weightwatch import WeightWatch, diff_runs, load_run  # noqa: E402
from keras_weightwatch.report import render_diff  # noqa: E402


def load_data(n: int):
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))[:n]
    return (d.images[order] / 16.0).astype("float32")[..., None], d.target[order].astype("int32")


def build(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        layers.Conv2D(8, 3, activation="relu", name="conv"),
        layers.Flatten(name="flatten"),
        layers.Dense(32, activation="relu", name="hidden"),
        layers.Dense(10, name="logits"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def shuffled_weights(model: keras.Model, seed: int = 7) -> list[np.ndarray]:
    """The model's weights with conv's kernels and hidden's units permuted; same function."""
    rng = np.random.default_rng(seed)
    (ck, cb), (hk, hb), (lk, lb) = (model.get_layer(n).get_weights()
                                    for n in ("conv", "hidden", "logits"))
    pc = rng.permutation(ck.shape[-1])
    ph = rng.permutation(hk.shape[-1])
    # Flatten orders hidden's inputs as (row, col, channel): permute the channel axis.
    h, w = model.get_layer("conv").output.shape[1:3]
    hk_in = hk.reshape(h, w, ck.shape[-1], -1)[:, :, pc, :].reshape(hk.shape)
    return [ck[..., pc], cb[pc], hk_in[:, ph], hb[ph], lk[ph], lb]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds of training")
    parser.add_argument("--logdir", default="runs/compare", help="where the three runs go")
    args = parser.parse_args()
    epochs = 2 if args.quick else 10
    x, y = load_data(400 if args.quick else 1500)
    if os.path.isdir(args.logdir):
        shutil.rmtree(args.logdir)  # a fresh comparison each time
    runs = {}
    models = {}
    for seed in (1, 2):
        keras.backend.clear_session()  # the same layer names in every run
        model = build(seed)
        path = os.path.join(args.logdir, f"seed{seed}")
        model.fit(x, y, epochs=epochs, batch_size=32, verbose=0,
                  callbacks=[WeightWatch(path, kernel_images=False, histograms=False)])
        runs[f"seed{seed}"], models[seed] = path, model

    keras.backend.clear_session()
    twin = build(1)
    twin.set_weights(shuffled_weights(models[1]))
    same = np.allclose(twin.predict(x, verbose=0), models[1].predict(x, verbose=0), atol=1e-4)
    print(f"seed1-shuffled computes the same function as seed1: {same}")
    twin.optimizer.learning_rate.assign(0.0)  # record the weights as they are
    path = os.path.join(args.logdir, "seed1-shuffled")
    twin.fit(x, y, epochs=1, batch_size=32, verbose=0,
             callbacks=[WeightWatch(path, kernel_images=False, histograms=False)])
    runs["seed1-shuffled"] = path

    for other in ("seed1-shuffled", "seed2"):
        result = diff_runs(runs["seed1"], runs[other])
        print(f"\nseed1 vs {other}: per layer, raw cosine -> cosine after matching units")
        for layer in result.layers:
            print(f"  {layer.name:<8} {layer.cosine:+.4f} -> {layer.matched_cosine:+.4f}")

    print(f"\n$ weightwatch diff {runs['seed1']} {runs['seed1-shuffled']}")
    print(render_diff(diff_runs(runs["seed1"], runs["seed1-shuffled"])))
    last = load_run(runs["seed1"]).logs()
    print(f"\nseed1 trained {epochs} epochs, final loss {last['loss']:.3f}")


if __name__ == "__main__":
    main()
