"""`weightwatch demo`: train small models on data that ships with scikit-learn and watch them.

Nothing is downloaded. The demo needs the `demo` extra
(`pip install 'keras-weightwatch[demo]'`: scikit-learn, scipy, TensorFlow)
and trains, each into its own run directory under one log directory:

- `diabetes`: a linear regression on scikit-learn's diabetes data, whose
  inputs have names (age, sex, bmi, bp, s1..s6, and the derived ratio
  ldl_hdl) and keep their own units, so the top-k feature table shows which
  named inputs the model leans on, epoch by epoch (the book's Boston-housing
  flow), with each weight also per standard deviation of its feature, and
  the features that correlate (ldl_hdl with s4) flagged;
- `digits-seed1` and `digits-seed2`: the same small CNN on the 8x8 digits,
  with two seeds; its first conv layer has kernels of shape (3, 3, 1, 5) as
  in the course, drawn as image grids, and four test digits are filtered by
  each kernel; the same digits get saliency maps (vanilla gradients and
  HiResCAM) and every weight its gradient norm on 64 test digits;
- `photos`: a small convolutional autoencoder of patches of the two colour
  photographs scikit-learn ships, whose first-layer kernels (5, 5, 3, 8),
  started near zero as AlexNet's were, learn smooth colour and luminance
  patterns, drawn as RGB images (like AlexNet's first-layer filters), with
  both photographs filtered by them.

Then it prints the `tensorboard` command that shows it all and a
`weightwatch diff` of the two digits runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TextIO

import numpy as np

from .errors import WeightWatchError, received
from .features import FeatureWeight

__all__ = ["DemoResult", "DemoSettings", "render_result", "run_and_print", "run_demo"]

EXTRA_HINT = "pip install 'keras-weightwatch[demo]'"
MARKER_FILE = ".weightwatch-demo"
DEFAULT_LOGDIR = "weightwatch-demo"
RUN_NAMES = ("diabetes", "digits-seed1", "digits-seed2", "photos")
DIGITS_MODEL = "digits_cnn"
DIGITS_FIRST_CONV = "conv1"
SAMPLE_DIGITS = (0, 1, 4, 7)
# The digits runs' saliency maps: vanilla gradients and HiResCAM on the last convolution
# (Grad-CAM's map of this Flatten + Dense head is often zero everywhere: see `saliency`).
DIGITS_SALIENCY = ("vanilla", "hirescam")
BATCH_SIZE = 32
GRADIENT_PROBE = 64  # examples of the digits test split in the gradient statistics' batch


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """How much the demo trains.

    Attributes:
        linear_epochs: Epochs of the diabetes regression.
        cnn_epochs: Epochs of each digits CNN.
        digits: How many digits images (of 1,797) are used, 80% for training.
        photo_epochs: Epochs of the photographs CNN.
        photo_patches: How many 24x24 patches of each photograph are used.

    Example:

    >>> from keras_weightwatch.demo import QUICK
    >>> QUICK.cnn_epochs
    2
    """

    linear_epochs: int = 20
    cnn_epochs: int = 8
    digits: int = 1797
    photo_epochs: int = 6
    photo_patches: int = 400


FULL = DemoSettings()
QUICK = DemoSettings(linear_epochs=4, cnn_epochs=2, digits=300, photo_epochs=2, photo_patches=100)


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What `run_demo` wrote and found.

    Attributes:
        logdir: The log directory holding every run.
        runs: Run name -> run directory, in training order.
        top_features: The diabetes model's top-k rows after its last epoch
            (features of largest |weight|, largest first, with their
            standardized weight and correlated partner).
        diff_text: The `weightwatch diff` of the two digits runs, as printed.
        seconds: Stage name -> seconds it took.

    Example:

    >>> r = DemoResult("d", {}, [], "", {"import": 1.5, "diabetes": 2.0})
    >>> r.total_seconds
    3.5
    """

    logdir: str
    runs: Mapping[str, str]
    top_features: list[FeatureWeight]
    diff_text: str
    seconds: Mapping[str, float]

    @property
    def total_seconds(self) -> float:
        """The time of all stages together."""
        return float(sum(self.seconds.values()))


def _check_extra() -> None:
    """Raise an ImportError naming the `demo` extra when scikit-learn or scipy is missing."""
    missing = []
    for module in ("sklearn", "scipy"):
        try:
            __import__(module)
        except ImportError:
            missing.append({"sklearn": "scikit-learn"}.get(module, module))
    if missing:
        raise ImportError(
            f"`weightwatch demo` needs {' and '.join(missing)}, which the `demo` extra "
            f"installs: {EXTRA_HINT}"
        )


@contextlib.contextmanager
def _backend_start_up_notes_hidden() -> Iterator[None]:
    """Keep what a backend's C++ runtime prints to file descriptor 2 while it starts out of
    the demo's progress display (TensorFlow's oneDNN and absl notes); shown if it fails."""
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 to redirect
        yield
        return
    with tempfile.TemporaryFile() as notes:
        os.dup2(notes.fileno(), 2)
        failed = True
        try:
            yield
            failed = False
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                notes.seek(0)
                sys.stderr.write(notes.read().decode(errors="replace"))


def _require() -> tuple[Any, Any]:
    """Import Keras and scikit-learn's datasets, or say which extra to install."""
    _check_extra()
    try:
        with _backend_start_up_notes_hidden():
            import keras

            keras.ops.zeros(1)  # the backend starts its runtime here
    except ImportError as e:
        raise ImportError(
            f"`weightwatch demo` needs Keras with a working backend ({e}); the `demo` extra "
            f"installs TensorFlow for it: {EXTRA_HINT}"
        ) from e
    from sklearn import datasets

    return keras, datasets


def _prepare_logdir(logdir: str) -> None:
    """Create `logdir`, or clear the runs an earlier demo wrote there; refuse anything else."""
    if os.path.exists(logdir) and not os.path.isdir(logdir):
        raise WeightWatchError(f"{logdir}: exists and is not a directory; pass another --logdir")
    if os.path.isdir(logdir) and os.listdir(logdir):
        if not os.path.isfile(os.path.join(logdir, MARKER_FILE)):
            raise WeightWatchError(
                f"{logdir}: exists and was not written by `weightwatch demo`; "
                "pass another --logdir (the demo only replaces its own runs)"
            )
        for name in RUN_NAMES:
            path = os.path.join(logdir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
    os.makedirs(logdir, exist_ok=True)
    with open(os.path.join(logdir, MARKER_FILE), "w") as f:
        f.write("Written by `weightwatch demo`; running it again replaces the runs here.\n")


class _Progress:
    """One line per stage: what it does, then how long it took and its result."""

    def __init__(self, stream: TextIO | None, stages: int):
        self.stream = stream
        self.stages = stages
        self.n = 0
        self.seconds: dict[str, float] = {}

    def stage(self, name: str, text: str, fn: Callable[[], Any],
              summary: Callable[[Any], str] | None = None) -> Any:
        self.n += 1
        if self.stream is not None:
            print(f"[{self.n}/{self.stages}] {text} ...", end="", file=self.stream, flush=True)
        start = time.perf_counter()
        result = fn()
        took = time.perf_counter() - start
        self.seconds[name] = took
        if self.stream is not None:
            tail = f"  {summary(result)}" if summary is not None else ""
            print(f" {took:.1f} s{tail}", file=self.stream, flush=True)
        return result


# --------------------------------------------------------------------------- data


# The diabetes features' own units, and the derived ratio the demo adds: LDL/HDL is read
# beside s4 (total cholesterol / HDL), a ratio over the same HDL, and correlates with it.
DIABETES_RATIO = "ldl_hdl"
DIABETES_TOP_K = 5


def _diabetes_data(datasets: Any) -> dict[str, Any]:
    """scikit-learn's diabetes data in its own units, split 80/20 with a fixed seed.

    The 10 measured features keep their units (age in years, sex coded 1/2,
    bmi in kg/m^2, bp in mmHg, s1..s3 and s6 in mg/dL, s4 a ratio, s5 a log),
    so their spreads differ by a factor of 70; an 11th feature, `ldl_hdl`
    (s2 / s3, the LDL/HDL ratio), correlates with s4 (r about 0.95), as s1
    and s2 do with each other (r about 0.90). Every feature is centred on its
    training mean (a shift: a weight is still per unit of the feature).

    Returns a dict with `names` (the 11 feature names), `x_train`, `y_train`,
    `x_test`, `y_test` (float32; y is the disease progression in its own units).
    """
    d = datasets.load_diabetes(scaled=False)
    order = np.random.default_rng(0).permutation(len(d.target))
    cut = int(0.8 * len(order))
    tr, te = order[:cut], order[cut:]
    names = list(d.feature_names)
    x = d.data.astype("float64")
    x = np.concatenate([x, x[:, [names.index("s2")]] / x[:, [names.index("s3")]]], axis=1)
    mean = x[tr].mean(axis=0)
    return {
        "names": names + [DIABETES_RATIO],
        "x_train": (x[tr] - mean).astype("float32"),
        "y_train": d.target[tr].astype("float32"),
        "x_test": (x[te] - mean).astype("float32"),
        "y_test": d.target[te].astype("float32"),
    }


def _digits_data(datasets: Any, n: int = 1797) -> dict[str, Any]:
    """scikit-learn's 8x8 digits as (N, 8, 8, 1) floats in [0, 1], split 80/20 with a fixed seed.

    Also returns `samples`: one test image of each digit in `SAMPLE_DIGITS`
    (the images filtered by the kernels), and `sample_labels`.
    """
    d = datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))[:n]
    images = (d.images[order] / 16.0).astype("float32")[..., None]
    labels = d.target[order].astype("int32")
    cut = int(0.8 * len(order))
    x_test, y_test = images[cut:], labels[cut:]
    picks = []
    for digit in SAMPLE_DIGITS:
        hits = np.flatnonzero(y_test == digit)
        if hits.size:
            picks.append(int(hits[0]))
    return {
        "x_train": images[:cut],
        "y_train": labels[:cut],
        "x_test": x_test,
        "y_test": y_test,
        "samples": x_test[picks],
        "sample_labels": [int(y_test[i]) for i in picks],
    }


def _photos_data(datasets: Any, patches: int = 400) -> dict[str, Any]:
    """Patches of scikit-learn's two sample photographs, to be drawn back by an autoencoder.

    Returns `x_train`, `x_test`: 24x24x3 patches in [0, 1] from both
    photographs at half size (80% / 20%), `y_train`, `y_test`: the same
    patches (the target of an autoencoder), and `samples`: both photographs at
    a quarter size (2, 107, 160, 3), to be filtered by the kernels.
    """
    photos = np.stack(datasets.load_sample_images().images).astype("float32") / 255.0
    half = photos[:, ::2, ::2, :]
    rng = np.random.default_rng(0)
    size = 24
    xs = []
    for photo in half:
        rows = rng.integers(0, half.shape[1] - size, patches)
        cols = rng.integers(0, half.shape[2] - size, patches)
        xs += [photo[r:r + size, c:c + size] for r, c in zip(rows, cols)]
    x = np.stack(xs)[rng.permutation(len(xs))]
    cut = int(0.8 * len(x))
    return {
        "x_train": x[:cut],
        "y_train": x[:cut],
        "x_test": x[cut:],
        "y_test": x[cut:],
        "samples": np.ascontiguousarray(photos[:, ::4, ::4, :]),
    }


# --------------------------------------------------------------------------- models


def _linear_model(keras: Any, features: int, steps: int, target_mean: float) -> Any:
    """A linear regression: one Dense unit on `features` inputs in their own units.

    Adam (whose steps do not depend on each input's scale) with a learning
    rate decaying from 1 to 0 over the `steps` of training, and the bias
    starting at the target's mean: the weights settle within a few epochs
    although the inputs' spreads differ by a factor of 70.
    """
    model = keras.Sequential(
        [
            keras.Input((features,), name="features"),
            keras.layers.Dense(
                1, name="linear", bias_initializer=keras.initializers.Constant(target_mean)
            ),
        ],
        name="linear_regression",
    )
    schedule = keras.optimizers.schedules.CosineDecay(1.0, steps)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse", metrics=["mae"])
    return model


def _digits_cnn(keras: Any) -> Any:
    """The digits CNN: Conv(5 kernels 3x3) - Conv(8 kernels 3x3) - pool - Dense(10)."""
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1), name="digit"),
            layers.Conv2D(5, 3, padding="same", activation="relu", name=DIGITS_FIRST_CONV),
            layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2"),
            layers.MaxPooling2D(2, name="pool"),
            layers.Flatten(name="flatten"),
            layers.Dense(10, activation="softmax", name="classes"),
        ],
        name=DIGITS_MODEL,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


PHOTOS_FIRST_CONV = "colour_conv"
# Image tags are grouped by model name, and TensorBoard's Images tab lists the groups in
# name order, the first screen filled by the first one: this model's name sorts before
# `digits_cnn`, so its photographs' responses and RGB kernels are what a person sees first.
PHOTOS_MODEL = "colour_autoencoder"
# AlexNet's initialisation (zero-mean Gaussian, std 0.01): the kernels start near zero, so
# what they show after training is what they learned, not the random start.
PHOTOS_INIT_STD = 0.01


def _photos_autoencoder(keras: Any, steps: int) -> Any:
    """A linear convolutional autoencoder of photo patches (any image size divisible by 2).

    Eight RGB kernels (5x5) code each patch at half resolution (8 numbers
    per 4 pixels: fewer than the 12 colour values they stand for) and a
    transposed convolution draws the patch back; to fit, the kernels become
    the smooth colour and luminance patterns that photographs are made of.
    """
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((None, None, 3), name="image"),
            layers.Conv2D(8, 5, padding="same", name=PHOTOS_FIRST_CONV,
                          kernel_initializer=keras.initializers.RandomNormal(
                              stddev=PHOTOS_INIT_STD)),
            layers.AveragePooling2D(2, name="pool"),
            layers.Conv2DTranspose(3, 4, strides=2, padding="same", name="decode"),
        ],
        name=PHOTOS_MODEL,
    )
    # Adam's steps shrink to zero over the `steps` of training (a cosine from 0.03), so the
    # kernels settle instead of carrying the last steps' noise.
    schedule = keras.optimizers.schedules.CosineDecay(0.03, steps, alpha=0.1)
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="mse")
    return model


def _fit(keras: Any, model: Any, data: Mapping[str, Any], run_dir: str, epochs: int,
         batch_size: int, watch: Any) -> dict[str, float]:
    history = model.fit(
        data["x_train"],
        data["y_train"],
        validation_data=(data["x_test"], data["y_test"]),
        epochs=epochs,
        batch_size=batch_size,
        verbose=0,
        # Keras's own TensorBoard callback writes the loss curves beside the weight
        # views (run_dir/train, run_dir/validation); WeightWatch writes run_dir/weights.
        callbacks=[watch, keras.callbacks.TensorBoard(log_dir=run_dir)],
    )
    return {k: float(v[-1]) for k, v in history.history.items()}


def _train(keras: Any, build: Callable[[], Any], data: Mapping[str, Any], run_dir: str,
           epochs: int, seed: int, **watch_args: Any) -> dict[str, float]:
    """Build and train one demo model with a fixed seed, watched into `run_dir`."""
    from .callback import WeightWatch

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = build()
    watch = WeightWatch(run_dir, **watch_args)
    return _fit(keras, model, data, run_dir, epochs, BATCH_SIZE, watch)


class _Stage(NamedTuple):
    """One stage of the demo, as `_Progress.stage` runs it."""

    name: str
    text: str
    fn: Callable[[], Any]
    summary: Callable[[Any], str]


def _accuracy(logs: Mapping[str, float]) -> str:
    return f"val_accuracy {logs['val_accuracy']:.3f}"


def _training_stages(keras: Any, datasets: Any, diabetes: Mapping[str, Any],
                     runs: Mapping[str, str], settings: DemoSettings) -> list[_Stage]:
    """The demo's four trainings, in order."""
    # (a) The book's flow: a linear model whose inputs have names.
    steps = settings.linear_epochs * -(-len(diabetes["x_train"]) // BATCH_SIZE)
    linear = functools.partial(_linear_model, keras, len(diabetes["names"]), steps,
                               float(np.mean(diabetes["y_train"])))
    out = [_Stage(
        "diabetes",
        f"diabetes: linear regression on {len(diabetes['names'])} named features in their "
        f"own units, {settings.linear_epochs} epochs",
        functools.partial(
            _train, keras, linear, diabetes, runs["diabetes"], settings.linear_epochs, 0,
            feature_names=diabetes["names"], feature_data=diabetes["x_train"],
            top_k=DIABETES_TOP_K,
        ),
        lambda logs: f"val_mae {logs['val_mae']:.1f}",
    )]
    # (b), (c) The course's flow: a CNN whose first layer has (3, 3, 1, 5) kernels,
    # trained twice with different seeds; clear_session keeps the layer names equal.
    digits = _digits_data(datasets, settings.digits)
    for seed in (1, 2):
        name = f"digits-seed{seed}"
        out.append(_Stage(
            name,
            f"{name}: CNN on 8x8 digits, kernels (3,3,1,5), {settings.cnn_epochs} epochs",
            functools.partial(_train, keras, functools.partial(_digits_cnn, keras), digits,
                              runs[name], settings.cnn_epochs, seed,
                              sample_images=digits["samples"], saliency=DIGITS_SALIENCY,
                              gradient_data=(digits["x_test"][:GRADIENT_PROBE],
                                             digits["y_test"][:GRADIENT_PROBE])),
            _accuracy,
        ))
    # (d) AlexNet-style colour kernels on the two sample photographs.
    photos = _photos_data(datasets, settings.photo_patches)
    out.append(_Stage(
        "photos",
        f"photos: autoencoder with RGB kernels (5,5,3,8) on photo patches, "
        f"{settings.photo_epochs} epochs",
        functools.partial(_train, keras, functools.partial(
            _photos_autoencoder, keras,
            settings.photo_epochs * -(-len(photos["x_train"]) // BATCH_SIZE)), photos,
                          runs["photos"], settings.photo_epochs, 0,
                          sample_images=photos["samples"]),
        lambda logs: f"val_loss {logs['val_loss']:.4f}",
    ))
    return out


def _top_features(run_dir: str, names: list[str], data: np.ndarray,
                  k: int = DIABETES_TOP_K, key: str = "linear/kernel") -> list[FeatureWeight]:
    """The top-k rows of a run's last snapshot: largest |weight| first, with `data`'s columns."""
    from .features import top_k_features
    from .run import load_run

    kernel = load_run(run_dir).weights("last", keys=[key])[key]
    return top_k_features(kernel, names, k, data)


def _diff_text(run_a: str, run_b: str) -> str:
    """The text `weightwatch diff RUN_A RUN_B` prints."""
    from .compare import diff_runs
    from .report import render_diff

    return render_diff(diff_runs(run_a, run_b))


# --------------------------------------------------------------------------- the demo


def run_demo(
    logdir: str | os.PathLike = DEFAULT_LOGDIR,
    *,
    quick: bool = False,
    progress: TextIO | None = None,
) -> DemoResult:
    """Train the demo's models into `logdir` and return what was written.

    The runs are `diabetes` (a linear regression with 11 named features in
    their own units), `digits-seed1` and `digits-seed2` (one small CNN on 8x8 digits
    trained with two seeds; first conv layer kernels (3, 3, 1, 5)) and
    `photos` (a small CNN with RGB kernels on scikit-learn's two sample
    photographs). Seeds are fixed, nothing is downloaded. Running it again on
    the same `logdir` replaces the runs it wrote there; a non-empty `logdir`
    that the demo did not write is refused.

    Args:
        logdir: The directory that receives one run directory per model.
            Defaults to `"weightwatch-demo"`.
        quick: Train for a few seconds only (fewer epochs and samples), for
            tests. Defaults to False.
        progress: Where to print one line per stage with its time. Defaults
            to None (silent).

    Returns:
        A `DemoResult`.

    Raises:
        ImportError: scikit-learn or scipy is missing (install the `demo` extra).
        WeightWatchError: `logdir` holds something other than an earlier demo.

    Example:

    >>> from keras_weightwatch.demo import run_demo
    >>> result = run_demo("weightwatch-demo", quick=True)  # doctest: +SKIP
    >>> sorted(result.runs)                                   # doctest: +SKIP
    ['diabetes', 'digits-seed1', 'digits-seed2', 'photos']
    """
    if not isinstance(logdir, (str, os.PathLike)):
        raise TypeError(f"`logdir` must be a path. {received('logdir', logdir)}")
    if not isinstance(quick, bool):
        raise TypeError(f"`quick` must be True or False. {received('quick', quick)}")
    logdir = os.fspath(logdir)
    settings = QUICK if quick else FULL
    _check_extra()  # before any output
    _prepare_logdir(logdir)
    steps = _Progress(progress, stages=6)

    keras, datasets = steps.stage(
        "import", "loading Keras and scikit-learn's bundled data", _require
    )
    runs = {name: os.path.join(logdir, name) for name in RUN_NAMES}
    diabetes = _diabetes_data(datasets)
    for stage in _training_stages(keras, datasets, diabetes, runs, settings):
        steps.stage(*stage)
    text = steps.stage(
        "diff",
        "diffing digits-seed1 and digits-seed2",
        lambda: _diff_text(runs["digits-seed1"], runs["digits-seed2"]),
    )
    return DemoResult(
        logdir=logdir,
        runs=runs,
        top_features=_top_features(runs["diabetes"], diabetes["names"], diabetes["x_train"]),
        diff_text=text,
        seconds=dict(steps.seconds),
    )


def render_result(result: DemoResult) -> str:
    """What `weightwatch demo` prints after its progress lines.

    Args:
        result: What `run_demo` returned.

    Returns:
        The text: the runs, the diabetes model's top features, the
        `tensorboard` command and the diff of the two digits runs.

    Example:

    >>> top = [FeatureWeight(1, 3, "s4", 2.4, (2.4,), 1.3, 3.1, "ldl_hdl", 0.946)]
    >>> r = DemoResult("wd", {"digits-seed1": "wd/a", "digits-seed2": "wd/b"},
    ...                top, "(diff)", {"all": 30.0})
    >>> print(render_result(r).splitlines()[5])
      1. s4         +2.400  standardized    +3.100  correlated with ldl_hdl (r=0.95)
    >>> print(render_result(r).splitlines()[-4])
      tensorboard --logdir wd --samples_per_plugin images=100
    """
    q = shlex.quote
    out = [f"Done in {result.total_seconds:.1f} s. Runs written under {result.logdir}:"]
    for name, path in result.runs.items():
        out.append(f"  {name:<13} {path}")
    out.append("")
    out.append(f"diabetes: the {len(result.top_features)} largest weights after the last epoch "
               "(per unit of each feature; standardized: per std of the feature):")
    for r in result.top_features:
        std = "" if r.standardized is None else f"  standardized {r.standardized:+9.3f}"
        pair = "" if r.partner is None else f"  correlated with {r.partner} (r={r.correlation:.2f})"
        out.append(f"  {r.rank}. {r.name:<7} {r.weight:+9.3f}{std}{pair}")
    out.append("")
    out.append("See every view in TensorBoard (weights, kernels, filtered images, top-k table):")
    out.append(f"  tensorboard --logdir {q(result.logdir)} --samples_per_plugin images=100")
    out.append("")
    out.append(
        f"$ weightwatch diff {q(result.runs['digits-seed1'])} {q(result.runs['digits-seed2'])}"
    )
    out.append(result.diff_text.rstrip("\n"))
    return "\n".join(out)


def run_and_print(logdir: str | os.PathLike = DEFAULT_LOGDIR, *, quick: bool = False,
                  stdout: TextIO | None = None) -> DemoResult:
    """`weightwatch demo`: run the demo with progress lines, then print `render_result`."""
    stdout = stdout or sys.stdout
    result = run_demo(logdir, quick=quick, progress=stdout)
    print(file=stdout)
    print(render_result(result), file=stdout)
    return result


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `python -m` convenience
    """`python -m keras_weightwatch.demo [--quick] [--logdir DIR]`, as `weightwatch demo`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m keras_weightwatch.demo")
    parser.add_argument("--logdir", default=DEFAULT_LOGDIR)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        run_and_print(args.logdir, quick=args.quick)
    except (ImportError, WeightWatchError) as e:
        print(f"weightwatch demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
