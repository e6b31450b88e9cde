"""Planted pathologies and healthy trainings for the health rules (`keras_weightwatch.health`).

Each planted case is a real Keras training that plants exactly one problem, and names the
finding it should produce: the rule, the layer, and the first step at which the stored data
shows it. Each healthy case is a training with nothing wrong. `bench_health.py` runs them all
and prints the confusion table (planted x reported); tests/integration/test_health_cases.py
keeps the table true. Imported from the scripts' folder (`python benchmarks/bench_health.py`
puts it on `sys.path`; the tests add it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

EPOCHS = 4


class Case(NamedTuple):
    """One training: its name, the finding planted (rule, layer; None when healthy), the
    step at which the stored data first shows it ("initial" for the initial snapshot), and
    the function that trains it into a run directory."""

    name: str
    rule: str | None
    layer: str | None
    shows_at: int | str | None
    train: Callable[[str], Any]


def _keras(seed: int = 0) -> Any:
    import keras

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    return keras


def _regression(n: int = 512, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    w = rng.normal(size=(d, 1)).astype("float32")
    y = (np.tanh(x @ w) + 0.1 * rng.normal(size=(n, 1))).astype("float32")
    return x, y


def _watch(run_dir: str, **kwargs: Any) -> Any:
    from keras_weightwatch import WeightWatch

    kwargs.setdefault("histograms", False)
    kwargs.setdefault("kernel_images", False)
    return WeightWatch(run_dir, **kwargs)


def _fit(model: Any, run_dir: str, x: np.ndarray, y: np.ndarray, *, epochs: int = EPOCHS,
         batch_size: int = 64, **watch: Any) -> Any:
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=False,
              callbacks=[_watch(run_dir, **watch)])
    return model


def _mlp(keras: Any, d: int, hidden: list[Any], optimizer: Any, loss: str = "mse") -> Any:
    inputs = keras.Input((d,))
    h = inputs
    for layer in hidden:
        h = layer(h)
    model = keras.Model(inputs, keras.layers.Dense(1, name="out")(h))
    model.compile(optimizer=optimizer, loss=loss)
    return model


# ------------------------------------------------------------------ planted pathologies


def nan_learning_rate(run_dir: str) -> Any:
    """SGD with a learning rate so large that the weights overflow within the first epoch."""
    keras = _keras()
    x, y = _regression()
    model = _mlp(keras, 8, [keras.layers.Dense(32, activation="relu", name="hidden1"),
                            keras.layers.Dense(32, activation="relu", name="hidden2")],
                 keras.optimizers.SGD(learning_rate=1e6))
    return _fit(model, run_dir, x, y * 1e3)


def exploding(run_dir: str) -> Any:
    """Linear regression by SGD just above the stable learning rate (1.2 / the largest
    eigenvalue of X^T X / n): its weights grow geometrically, long before any overflow."""
    keras = _keras()
    x, y = _regression()
    lam = float(np.linalg.eigvalsh(x.T @ x / len(x)).max())
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(1, name="linear")(inputs))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.2 / lam), loss="mse")
    return _fit(model, run_dir, x, y, epochs=8, batch_size=128)


def large_update(run_dir: str) -> Any:
    """One layer initialised a thousand times too small for the learning rate."""
    keras = _keras()
    x, y = _regression()
    tiny = keras.initializers.RandomNormal(stddev=1e-4)
    model = _mlp(keras, 8, [keras.layers.Dense(32, activation="relu", name="hidden1"),
                            keras.layers.Dense(32, activation="relu", kernel_initializer=tiny,
                                               name="tiny"),
                            keras.layers.Dense(32, activation="relu", name="hidden3")],
                 keras.optimizers.Adam(1e-2))
    return _fit(model, run_dir, x, y)


def detached(run_dir: str) -> Any:
    """A layer whose output passes through stop_gradient: it gets no gradient."""
    keras = _keras()
    x, y = _regression()
    model = _mlp(keras, 8, [keras.layers.Dense(32, activation="relu", name="detached"),
                            keras.layers.Lambda(keras.ops.stop_gradient, name="stop"),
                            keras.layers.Dense(32, activation="relu", name="hidden2"),
                            keras.layers.Dense(32, activation="relu", name="hidden3")],
                 keras.optimizers.Adam(1e-3))
    return _fit(model, run_dir, x, y)


def vanishing(run_dir: str) -> Any:
    """Ten sigmoid layers: the gradient shrinks about four-fold per layer."""
    keras = _keras()
    x, y = _regression()
    layers = [keras.layers.Dense(16, activation="sigmoid", name=f"sigmoid{i}")
              for i in range(10)]
    model = _mlp(keras, 8, layers, keras.optimizers.Adam(1e-3))
    return _fit(model, run_dir, x, y, gradient_data=(x[:64], y[:64]))


def exploding_gradients(run_dir: str) -> Any:
    """Forty-eight tanh layers initialised with a gain of 4 (the chaotic regime): the gradient
    grows by a constant factor per layer toward the input while the activations stay
    bounded."""
    keras = _keras()
    x, y = _regression()
    big = keras.initializers.RandomNormal(stddev=4 / np.sqrt(32))
    layers = [keras.layers.Dense(32, activation="tanh", kernel_initializer=big,
                                 name=f"tanh{i}") for i in range(48)]
    model = _mlp(keras, 8, layers, keras.optimizers.Adam(1e-4))
    return _fit(model, run_dir, x, y, gradient_data=(x[:64], y[:64]))


def _dead_bias(shape: Any, dtype: Any = None) -> Any:
    n = int(shape[0])
    return np.r_[np.full(n - n // 4, -10.0), np.zeros(n // 4)].astype("float32")


def dead_relu(run_dir: str) -> Any:
    """A ReLU layer whose bias starts at -10 for three quarters of its units."""
    keras = _keras()
    x, y = _regression()
    model = _mlp(keras, 8, [keras.layers.Dense(32, activation="relu", name="hidden1"),
                            keras.layers.Dense(32, activation="relu", bias_initializer=_dead_bias,
                                               name="dead"),
                            keras.layers.Dense(32, activation="relu", name="hidden3")],
                 keras.optimizers.Adam(1e-3))
    return _fit(model, run_dir, x, y, gradient_data=(x[:64], y[:64]))


def constant_init(run_dir: str) -> Any:
    """Two layers with a constant kernel initialiser: the first one's units stay identical."""
    keras = _keras()
    x, y = _regression()
    const = keras.initializers.Constant(0.1)
    model = _mlp(keras, 8, [keras.layers.Dense(16, activation="relu", kernel_initializer=const,
                                               name="constant"),
                            keras.layers.Dense(16, activation="relu", kernel_initializer=const,
                                               name="constant2")],
                 keras.optimizers.Adam(1e-3))
    return _fit(model, run_dir, x, y)


def lora_frozen_b(run_dir: str) -> Any:
    """A LoRA fine-tune whose adapter B is not trainable: the adapter never moves."""
    keras = _keras()
    x, y = _regression()
    model = _mlp(keras, 8, [keras.layers.Dense(32, activation="relu", name="hidden1"),
                            keras.layers.Dense(32, activation="relu", name="adapted")],
                 keras.optimizers.Adam(1e-3))
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    layer = model.get_layer("adapted")
    layer.enable_lora(4)
    layer.lora_kernel_b.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return _fit(model, run_dir, x, y)


def _trap_kernel(shape: Any, dtype: Any = None) -> Any:
    rng = np.random.default_rng(3)
    w = rng.normal(scale=np.sqrt(2.0 / (shape[0] + shape[1])), size=shape)
    w[5, 7] = 40 * np.abs(w).max()
    return w.astype("float32")


def trap(run_dir: str) -> Any:
    """One weight set to forty times the largest of its layer (a corrupted load)."""
    keras = _keras()
    x, y = _regression()
    model = _mlp(keras, 8, [keras.layers.Dense(64, activation="relu", name="hidden1"),
                            keras.layers.Dense(64, activation="relu",
                                               kernel_initializer=_trap_kernel, name="trapped"),
                            keras.layers.Dense(64, activation="relu", name="hidden3")],
                 keras.optimizers.Adam(1e-3))
    return _fit(model, run_dir, x, y, spectral_freq=1, spectral_traps=True)


PLANTED = (
    Case("learning rate until NaN", "non_finite", "hidden1", 0, nan_learning_rate),
    Case("learning rate just unstable", "exploding_weights", "linear", None, exploding),
    Case("layer initialised too small", "large_update", "tiny", 0, large_update),
    Case("layer behind stop_gradient", "not_learning", "detached", 0, detached),
    Case("ten sigmoid layers", "vanishing_gradients", "sigmoid0", "initial", vanishing),
    Case("tanh layers of gain 4", "exploding_gradients", "tanh0", "initial",
         exploding_gradients),
    Case("ReLU bias of -10", "dead_units", "dead", "initial", dead_relu),
    Case("constant initialiser", "symmetry", "constant", "initial", constant_init),
    Case("LoRA B not trainable", "lora_stalled", "adapted", 0, lora_frozen_b),
    Case("one weight 40x the rest", "correlation_traps", "trapped", "initial", trap),
)
"""Every planted case. `shows_at` None: the step is read from the run (see its case)."""


# ------------------------------------------------------------------ healthy trainings


def _images(n: int = 64, size: int = 32, classes: int = 10, seed: int = 0) -> tuple[Any, Any]:
    """Scikit-learn's 8x8 digits, upsampled to `size` x `size` x 3 (no download)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(digits.images), n, replace=False)
    img = digits.images[pick] / 16.0
    img = np.kron(img, np.ones((size // 8, size // 8)))[..., None].repeat(3, axis=-1)
    return img.astype("float32"), (digits.target[pick] % classes).astype("int32")


def _application(run_dir: str, build: str) -> Any:
    keras = _keras()
    x, y = _images()
    model = getattr(keras.applications, build)(weights=None, input_shape=(32, 32, 3),
                                               classes=10)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy")
    return _fit(model, run_dir, x, y, epochs=3, batch_size=16,
                gradient_data=(x[:16], y[:16]))


def resnet50(run_dir: str) -> Any:
    """keras.applications.ResNet50, random init, a short fit on 32x32 digits."""
    return _application(run_dir, "ResNet50")


def mobilenet_v2(run_dir: str) -> Any:
    """keras.applications.MobileNetV2, random init, a short fit on 32x32 digits."""
    return _application(run_dir, "MobileNetV2")


def transformer(run_dir: str) -> Any:
    """A small Transformer encoder classifying token sequences (the token a sequence holds
    most often)."""
    keras = _keras()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 16, size=(512, 12)).astype("int32")
    y = np.array([np.bincount(r, minlength=16).argmax() for r in x], dtype="int32")
    inputs = keras.Input((12,), dtype="int32")
    h = keras.layers.Embedding(16, 32, name="embed")(inputs)
    a = keras.layers.MultiHeadAttention(4, 8, name="attention")(h, h)
    h = keras.layers.LayerNormalization(name="norm1")(h + a)
    f = keras.layers.Dense(64, activation="gelu", name="ffn_in")(h)
    h = keras.layers.LayerNormalization(name="norm2")(h + keras.layers.Dense(32, name="ffn_out")(f))
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(16, name="head")(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return _fit(model, run_dir, x, y, epochs=EPOCHS, batch_size=32,
                gradient_data=(x[:64], y[:64]))


def frozen_base(run_dir: str) -> Any:
    """A CNN trained on digits, then fine-tuned on a new head with its base frozen."""
    keras = _keras()
    x, y = _images(512, size=16)
    base = keras.Sequential([keras.Input((16, 16, 3)),
                             keras.layers.Conv2D(8, 3, activation="relu", name="conv1"),
                             keras.layers.MaxPooling2D(),
                             keras.layers.Conv2D(16, 3, activation="relu", name="conv2"),
                             keras.layers.GlobalAveragePooling2D()], name="base")
    model = keras.Sequential([base, keras.layers.Dense(10, name="head")])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="adam", loss=loss)
    model.fit(x, y, epochs=2, batch_size=64, verbose=0)
    base.trainable = False
    tuned = keras.Sequential([base, keras.layers.Dense(32, activation="relu", name="new"),
                              keras.layers.Dense(10, name="new_head")])
    tuned.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    return _fit(tuned, run_dir, x, y, gradient_data=(x[:64], y[:64]))


HEALTHY = (
    Case("ResNet50, random init", None, None, None, resnet50),
    Case("MobileNetV2, random init", None, None, None, mobilenet_v2),
    Case("small Transformer", None, None, None, transformer),
    Case("fine-tune, frozen base", None, None, None, frozen_base),
)
"""Healthy trainings besides the demo's runs (`bench_health.py` adds them)."""
