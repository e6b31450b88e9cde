"""The course's flow: draw a CNN's first-layer kernels and see what each one picks up.

A course on convolutional networks trains a small CNN, pulls its first conv
layer's kernels (shape 3x3x1x5: five 3x3 kernels on one input channel),
draws them, and convolves a test image with each kernel to see which edges it
responds to. Here the data are scikit-learn's 8x8 digits (no download) and the
two test images are two digits.

WeightWatch does the drawing at every epoch (TensorBoard's images dashboard:
the kernel grid and, for each sample image, the image next to its response to
every kernel); `responses_dir=` also writes those grids as PNG files. This
script then reads the trained kernels back from the run, prints them, says
which kind of edge each one detects, writes kernels.png with
keras_weightwatch.images, and convolves the two test digits with each kernel
itself (keras_weightwatch.responses.correlate) to show the numbers behind the
pictures, writing each digit's response grid as a PNG too.

    python examples/course_conv_kernels.py [--quick] [--logdir DIR]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from keras_weightwatch import WeightWatch, images, load_run  # noqa: E402
from keras_weightwatch.responses import correlate  # noqa: E402

# Edge detectors to compare each learned kernel with (cross-correlation, as Keras applies them).
SOBEL = {
    "vertical edges": np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], "float64"),
    "horizontal edges": np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], "float64"),
}


def load_data(n: int):
    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))[:n]
    x = (d.images[order] / 16.0).astype("float32")[..., None]
    y = d.target[order].astype("int32")
    cut = int(0.8 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def build_model():
    """First layer: five 3x3 kernels on one channel, kernel shape (3, 3, 1, 5), as in the course."""
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(5, (3, 3), padding="same", activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax", name="classes"),
    ])


def edge_kind(kernel: np.ndarray) -> tuple[str, float]:
    """Which Sobel detector a 3x3 kernel resembles most (|cosine| of the zero-mean kernel)."""
    k = kernel - kernel.mean()
    best = ("blob / brightness", 0.0)
    for name, s in SOBEL.items():
        cos = float((k * s).sum() / (np.linalg.norm(k) * np.linalg.norm(s) + 1e-12))
        if abs(cos) > abs(best[1]):
            best = (name, cos)
    return best if abs(best[1]) >= 0.5 else ("no clear edge", best[1])


def write_kernel_png(kernel: np.ndarray, path: str) -> str:
    """Draw all kernels of a conv layer as one PNG grid with keras_weightwatch.images."""
    grid = images.kernel_grid(kernel)  # one tile per (input, output) pair, zero drawn white
    with open(path, "wb") as f:
        f.write(images.encode_png(grid.image))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logdir", default="runs/course_conv_kernels")
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("WEIGHTWATCH_EXAMPLES_QUICK") == "1")
    args = parser.parse_args(argv)
    epochs, n = (2, 400) if args.quick else (10, 1797)

    x_train, y_train, x_test, y_test = load_data(n)
    # The two test images: the first test 0 and the first test 7.
    picks = [int(np.flatnonzero(y_test == d)[0]) for d in (0, 7)]
    test_images = x_test[picks]

    keras.utils.set_random_seed(0)
    model = build_model()
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    responses_dir = os.path.join(args.logdir, "responses_png")
    watch = WeightWatch(
        args.logdir,
        sample_images=test_images,  # convolved with each kernel of the first conv layer
        response_mode="kernel",  # plain cross-correlation with each kernel, as in the course
        responses_dir=responses_dir,  # the same grids as PNG files
        if_exists="new",
    )
    model.fit(x_train, y_train, validation_data=(x_test, y_test), epochs=epochs, batch_size=32,
              verbose=0, callbacks=[watch])

    run = load_run(watch.run_dir)
    kernel = np.asarray(run.weights("last")["conv1/kernel"])
    print(f"run: {run.path}; val_accuracy {run.logs()['val_accuracy']:.3f} after {len(run.epochs)} "
          "epochs")
    print(f"conv1/kernel has shape {kernel.shape}: {kernel.shape[-1]} kernels of 3x3 on "
          f"{kernel.shape[2]} channel")

    for k in range(kernel.shape[-1]):
        w = kernel[:, :, 0, k]
        kind, cos = edge_kind(w)
        print(f"\nkernel {k}: {kind} (cosine with Sobel {cos:+.2f})")
        for row in w:
            print("   " + " ".join(f"{v:+.2f}" for v in row))

    png = write_kernel_png(kernel, os.path.join(run.path, "kernels.png"))
    print(f"\nkernels drawn: {png}")

    # The course's second step: convolve each test image with each kernel.
    responses = correlate(test_images, kernel, padding="same")  # (2, 8, 8, 5), as Keras computes
    print("\nresponse of each test digit to each kernel (mean |response|: cross-correlation")
    print("with zero padding 'same', no bias or activation: the layer's output before its bias):")
    print(("digit  " + "  ".join(f"k{k:<5}" for k in range(kernel.shape[-1]))).rstrip())
    for label, res in zip((0, 7), responses):
        cells = np.abs(res).mean(axis=(0, 1))
        print((f"{label:>5}  " + "  ".join(f"{c:<6.3f}" for c in cells)).rstrip())
    for label, img, res in zip((0, 7), test_images, responses):
        grid = images.response_grid(img, res)  # the digit, then its response to each kernel
        path = os.path.join(run.path, f"responses_digit{label}.png")
        with open(path, "wb") as f:
            f.write(images.encode_png(grid.image))
        print(f"digit {label} and its {res.shape[-1]} responses drawn: {path}")

    pngs = sorted(
        os.path.relpath(os.path.join(root, f), run.path)
        for root, _, files in os.walk(responses_dir) for f in files if f.endswith(".png")
    )
    print(f"\nfiltered-image grids written by WeightWatch ({len(pngs)} PNG files under "
          f"{responses_dir}), e.g. {pngs[-1] if pngs else '(none)'}")
    print(f"TensorBoard images dashboard: tensorboard --logdir {run.path}")


if __name__ == "__main__":
    main()
