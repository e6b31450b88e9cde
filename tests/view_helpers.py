"""Tiny models for the view tests, and TensorBoard's own reader to read their summaries back."""

from __future__ import annotations

import os

import keras
import numpy as np
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.util import tensor_util

from keras_weightwatch.capture import describe_model
from keras_weightwatch.naming import model_group
from keras_weightwatch.summaries import kernel_tag, response_tag, saliency_tag
from keras_weightwatch.views import build_views

# The scalars of a weight without NaN or Inf (its nan_count and inf_count are written only once
# one is non-zero).
STATS = ("l2_norm", "mean", "std", "max_abs", "update_ratio")


def _acc(run_dir):
    acc = pea.EventAccumulator(os.path.join(run_dir, "weights"), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return acc


def _tags_by_plugin(acc):
    out: dict[str, set[str]] = {}
    for t in acc.Tags()["tensors"]:
        out.setdefault(acc.SummaryMetadata(t).plugin_data.plugin_name, set()).add(t)
    return out


def _values(acc, t):
    return {e.step: tensor_util.make_ndarray(e.tensor_proto) for e in acc.Tensors(t)}


def _decode(png: bytes) -> np.ndarray:
    import tensorflow as tf

    return tf.io.decode_png(png).numpy()


def _image(acc, t, step):
    arr = _values(acc, t)[step]
    assert arr.shape == (3,)  # width, height, one PNG
    img = _decode(arr[2])
    assert img.shape[:2] == (int(arr[1]), int(arr[0]))
    return img


def _group(model) -> str:
    """The model's group in TensorBoard, from its name as `describe_model` records it."""
    info = describe_model(model)
    return model_group(info.name, info.class_name)


def _kernel_tags(model, keys) -> dict[str, str]:
    """Weight key -> image tag of the kernel grids of `keys`, the model's conv kernels in order."""
    return {k: kernel_tag(_group(model), k, i, len(keys)) for i, k in enumerate(keys)}


def _response_tag(model, layer, sample) -> str:
    return response_tag(_group(model), layer, sample)


def _saliency_tag(model, method, sample) -> str:
    return saliency_tag(_group(model), method, sample)


def _cnn(filters=5, channels=1, size=8, ksize=3, activation=None):
    return keras.Sequential(
        [
            keras.Input((size, size, channels)),
            keras.layers.Conv2D(filters, ksize, activation=activation, name="conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(2, name="out"),
        ]
    )


def _images(n=2, size=8, channels=1, seed=0):
    return np.random.default_rng(seed).random((n, size, size, channels)).astype("float32")


def _fit(model, cb, epochs=2, x=None, y=None, lr=0.01, extra=()):
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    if x is None:
        shape = (16,) + tuple(model.input_shape[1:])
        x = np.random.default_rng(1).random(shape).astype("float32")
    if y is None:
        y = np.random.default_rng(2).random((len(x),) + model.output_shape[1:]).astype("float32")
    model.fit(x, y, epochs=epochs, batch_size=8, verbose=0, callbacks=[cb, *extra])


BOSTON = [
    "CRIM",
    "ZN",
    "INDUS",
    "CHAS",
    "NOX",
    "RM",
    "AGE",
    "DIS",
    "RAD",
    "TAX",
    "PTRATIO",
    "B",
    "LSTAT",
]


PLANTED = [-0.9, 0.8, 0.1, 0.6, -2.12, 2.85, 0.05, -3.73, 2.29, -1.9, -1.5, 0.7, -3.81]


def _boston_model():
    inp = keras.Input((13,), name="x")
    norm = keras.layers.Normalization(name="norm")
    h = norm(inp)
    h = keras.layers.Dropout(0.0)(h)
    out = keras.layers.Dense(1, name="price")(h)
    model = keras.Model(inp, out)
    norm.adapt(np.random.default_rng(0).normal(size=(64, 13)))
    k, b = model.get_layer("price").get_weights()
    model.get_layer("price").set_weights([np.array(PLANTED, "float32")[:, None], b])
    return model


def cb_views(cb, model):
    views = build_views(cb.settings)
    for v in views:
        v.prepare(model, describe_model(model))
    return views


class _EpochCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs += 1
