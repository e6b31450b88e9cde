"""The book's flow: which named inputs does a linear model lean on, epoch by epoch?

*Deep Learning with JavaScript* (section 2.4) trains a linear regression on
Boston housing and, at every `onEpochEnd`, reads `model.layers[0].getWeights()[0]`
to show the five weights of largest magnitude next to the feature each one
multiplies. Boston housing is not shipped with scikit-learn (it was removed),
so scikit-learn's diabetes data stands in: 10 named features (age, sex, bmi,
bp, s1..s6), standardized as the book recommends, so that weights compare.

WeightWatch snapshots the kernel every epoch and writes the top-k table to
TensorBoard's text dashboard; this script reads the run back with `load_run`
and prints the same table for every epoch, then the book's caveat in numbers:
s1 and s2 (total and LDL cholesterol) are correlated about 0.9, and the model
can trade weight between them.

    python examples/book_boston_style.py [--quick] [--logdir DIR] [--epochs N]

`--quick` (or the environment variable WEIGHTWATCH_EXAMPLES_QUICK=1) trains a
few epochs only.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_diabetes  # noqa: E402

from keras_weightwatch import WeightWatch, load_run  # noqa: E402
from keras_weightwatch.features import top_k_features  # noqa: E402

TOP_K = 5


def load_data():
    """Diabetes split 80/20 with a fixed seed; inputs standardized with the training statistics."""
    d = load_diabetes(scaled=False)
    order = np.random.default_rng(0).permutation(len(d.target))
    cut = int(0.8 * len(order))
    x, y = d.data, d.target.astype("float32")
    mean, std = x[order[:cut]].mean(axis=0), x[order[:cut]].std(axis=0)
    x = ((x - mean) / std).astype("float32")
    return list(d.feature_names), x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]




def least_squares(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The exact linear-regression weights (without the bias), for comparison."""
    a = np.c_[x, np.ones(len(x))].astype("float64")
    return np.linalg.lstsq(a, y.astype("float64"), rcond=None)[0][:-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default="runs/book_boston_style")
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("WEIGHTWATCH_EXAMPLES_QUICK") == "1")
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args(argv)
    epochs = args.epochs or (3 if args.quick else 40)

    names, x_train, y_train, x_test, y_test = load_data()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((len(names),)), keras.layers.Dense(1, name="linear")])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse", metrics=["mae"])

    watch = WeightWatch(
        args.logdir,
        feature_names=names,  # the names of the inputs the first Dense layer multiplies
        feature_data=x_train,  # flags correlated features; gives standardized weights
        top_k=TOP_K,
        if_exists="new",  # a second run of this script goes to LOGDIR-2, LOGDIR-3, ...
    )
    model.fit(x_train, y_train, validation_data=(x_test, y_test), epochs=epochs,
              batch_size=32, verbose=0, callbacks=[watch])

    # Everything below reads the run directory, not the model.
    run = load_run(watch.run_dir)
    print(f"run: {run.path}  (snapshots: {', '.join(s.name for s in run.snapshots)})")
    print(f"\nThe top-{TOP_K} weights of layer 'linear' at every epoch, from load_run:")
    header = "  ".join(f"{'#' + str(i + 1):<12}" for i in range(TOP_K))
    print(f"{'epoch':>5}  {'val_mae':>7}  {header}".rstrip())
    for step in run.epochs:
        kernel = run.weights(step, keys=["linear/kernel"])["linear/kernel"]
        top = top_k_features(kernel, names, TOP_K)
        cells = "  ".join(f"{f.name:<4} {f.weight:+7.2f}" for f in top)
        print(f"{step:>5}  {run.logs(step).get('val_mae', float('nan')):>7.2f}  {cells}")

    last = np.asarray(run.weights("last")["linear/kernel"])
    # The table WeightWatch writes to TensorBoard, recomputed from the run; a lower
    # correlation threshold than the default 0.9 flags s1 and s2 (r = 0.899).
    print(f"\nThe book's table after the last epoch (step {run.epochs[-1]}):")
    print("rank  feature  weight   correlated with")
    for f in top_k_features(last, names, TOP_K, data=x_train, threshold=0.85):
        partner = f"{f.partner} (r = {f.correlation:+.3f})" if f.partner else ""
        print(f"{f.rank:>4}  {f.name:<7}  {f.weight:+7.3f}  {partner}".rstrip())

    # The book's caveat (2.4.3): correlated features can trade weight. Least squares
    # on the same inputs, with and without s1, shows s2's weight change sign.
    corr = np.corrcoef(x_train.T)
    i, j = names.index("s1"), names.index("s2")
    last = last[:, 0]
    with_s1 = least_squares(x_train, y_train)[j]
    without_s1 = least_squares(np.delete(x_train, i, axis=1), y_train)[j - 1]
    print(
        f"\nCaveat: s1 and s2 are correlated (r = {corr[i, j]:.3f}). Least squares gives s2 the "
        f"weight {with_s1:+.2f} next to s1 but {without_s1:+.2f} without it: correlated "
        "features trade weight, so one weight alone can mislead."
    )
    print(f"\nTensorBoard (text dashboard shows the table per epoch): "
          f"tensorboard --logdir {os.path.dirname(os.path.abspath(run.path))}")


if __name__ == "__main__":
    main()
