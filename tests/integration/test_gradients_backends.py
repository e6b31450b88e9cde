"""Gradients on every backend: the same weights and batch give the same gradients.

This process writes one set of weights and one batch with numpy; a subprocess per
backend (`KERAS_BACKEND` set, as in test_backends.py) loads them, computes weight,
input and layer gradients of a small CNN with BatchNorm and Dropout, checks them
against finite differences and against what SGD(learning_rate=1) changes in one train
step, and writes everything back as .npz. Seeds come from numpy (and torch's own
generator): keras.utils.set_random_seed would import TensorFlow.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow

BACKENDS = ("tensorflow", "jax", "torch")
TIMEOUT_S = 300

SCRIPT = r'''
import json, os, sys
import numpy as np

out, inputs = sys.argv[1], sys.argv[2]
np.random.seed(0)
import keras
backend = keras.backend.backend()
if backend == "torch":
    import torch
    torch.manual_seed(0)
from keras_weightwatch.gradients import Loss, Unit, gradients
from keras_weightwatch import saliency

data = dict(np.load(inputs))
report = {"backend": backend}


def cnn(dtype="float32"):
    return keras.Sequential([
        keras.Input((8, 8, 1), dtype=dtype),
        keras.layers.Conv2D(3, 3, activation="relu", name="conv", dtype=dtype),
        keras.layers.BatchNormalization(name="bn", dtype=dtype),
        keras.layers.Dropout(0.5, name="drop", dtype=dtype),
        keras.layers.Flatten(dtype=dtype),
        keras.layers.Dense(4, activation="tanh", name="dense", dtype=dtype),
        keras.layers.Dense(3, name="logits", dtype=dtype),
    ])


model = cnn()
model.compile(optimizer="adam",
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.set_weights([data[f"w{i}"] for i in range(len(model.weights))])
x, y = data["x"], data["y"]
before = [w.copy() for w in model.get_weights()]
loss = gradients(model, x, Loss(y), weights=True, inputs=True)
unit = gradients(model, x, Unit(), inputs=True)
cam = gradients(model, x, Unit([0, 1, 2, 0]), layer="conv")
maps = saliency.gradcam(model, x, class_index=[0, 1, 2, 0]).maps
report["weights_unchanged"] = all(
    a.tobytes() == b.tobytes() for a, b in zip(before, model.get_weights()))
report["loss"] = loss.value
report["units"] = unit.units.tolist()
arrays = {f"grad/{k}": v for k, v in loss.weights.items()}
arrays |= {"loss_input": loss.inputs, "unit_input": unit.inputs,
           "cam_grad": cam.activation_gradients, "cam_act": cam.activations, "cam_map": maps}

# Central differences of the inference-mode output of a smooth float32 MLP with BatchNorm
# and Dropout (eps 1e-2: error O(eps^2) + float32 rounding / eps, about 1e-4 relative).
# (float64 models are not float64 throughout on every backend; the float64 checks at
# 1e-6 run on TensorFlow in tests/test_gradients.py.)
m32 = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"),
                        keras.layers.BatchNormalization(), keras.layers.Dropout(0.5),
                        keras.layers.Dense(2)])
m32.set_weights([data[f"m{i}"] for i in range(2)]
                + [np.full(5, v, "float32") for v in (1.5, 0.1, 0.2, 2.0)]
                + [data[f"m{i}"] for i in range(2, 4)])
xs = data["mx"]
g32 = gradients(m32, xs, Unit(1), inputs=True)
eps, fd = 1e-2, np.zeros(xs.shape)
for j in range(xs.size):
    hi, lo = xs.astype("float64"), xs.astype("float64")
    hi.flat[j] += eps
    lo.flat[j] -= eps
    f = [np.asarray(keras.ops.convert_to_numpy(m32(z.astype("float32"), training=False)),
                    "float64")[:, 1].sum() for z in (hi, lo)]
    fd.flat[j] = (f[0] - f[1]) / (2 * eps)
report["fd_max_error"] = float(np.abs(g32.inputs - fd).max())
report["fd_scale"] = float(np.abs(fd).max())

# What Keras's own train step applies: SGD(learning_rate=1) on a model without BN/Dropout.
mlp = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"),
                        keras.layers.Dense(2)])
mlp.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
mlp.set_weights([data[f"m{i}"] for i in range(4)])
g = gradients(mlp, data["mx"], Loss(data["my"]), weights=True)
w0 = mlp.get_weights()
mlp.train_on_batch(data["mx"], data["my"])
applied = [a - b for a, b in zip(w0, mlp.get_weights())]
report["sgd_max_error"] = max(float(np.abs(a - b).max())
                              for a, b in zip(g.weights.values(), applied))
report["sgd_scale"] = max(float(np.abs(a).max()) for a in applied)

# A mixed_float16 copy of the MLP (float32 variables, float16 compute) follows it.
keras.mixed_precision.set_dtype_policy("mixed_float16")
mixed = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"),
                          keras.layers.Dense(2, dtype="float32")])
keras.mixed_precision.set_dtype_policy("float32")
mixed.compile(loss="mse")
mixed.set_weights(w0)
gm = gradients(mixed, data["mx"], Loss(data["my"]), weights=True)
mlp.set_weights(w0)
g0 = gradients(mlp, data["mx"], Loss(data["my"]), weights=True)
report["mixed_dtypes"] = sorted({str(v.dtype) for v in gm.weights.values()})
report["mixed_max_error"] = max(float(np.abs(a - b).max())
                                for a, b in zip(gm.weights.values(), g0.weights.values()))

# Two inputs: one gradient per input.
ia, ib = keras.Input((3,), name="a"), keras.Input((3,), name="b")
both = keras.Model([ia, ib], keras.layers.Dense(2, name="two")(
    keras.layers.Concatenate()([ia, ib])))
both.set_weights([data["m0"][:, :2], data["m1"][:2]])
two = gradients(both, [data["mx"][:, :3], data["mx"][:, 3:]], Unit(1), inputs=True)
arrays["two_a"], arrays["two_b"] = two.inputs
report["two_expected"] = bool(np.allclose(np.concatenate(two.inputs, axis=1),
                                          np.tile(data["m0"][:, 1], (8, 1)), rtol=1e-6))

# A subclassed model: input gradients work (the kernel's column), layer tensors are refused.
class Sub(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2, name="dense")

    def call(self, x):
        return self.dense(x)


sub = Sub()
sub(data["mx"])
gs = gradients(sub, data["mx"], Unit(0), inputs=True)
report["subclassed_input"] = bool(np.allclose(
    gs.inputs, np.tile(keras.ops.convert_to_numpy(sub.dense.kernel)[:, 0], (8, 1)), rtol=1e-6))
try:
    gradients(sub, data["mx"], Unit(0), layer="dense")
    report["subclassed_layer_error"] = None
except ValueError as e:
    report["subclassed_layer_error"] = str(e)
try:
    gradients(keras.Sequential([keras.Input((6,)), keras.layers.Dense(1)]), data["mx"],
              Loss(data["my"][:, :1]), weights=True)
    report["uncompiled_loss_error"] = None
except ValueError as e:
    report["uncompiled_loss_error"] = str(e)

report["tensorflow_imported"] = "tensorflow" in sys.modules
np.savez(os.path.join(out, "arrays.npz"), **arrays)
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f)
'''

SHAPES = [(3, 3, 1, 3), (3,), (3,), (3,), (3,), (3,), (108, 4), (4,), (4, 3), (3,)]


def _inputs(path: str) -> None:
    rng = np.random.default_rng(42)
    arrays = {f"w{i}": rng.normal(scale=0.4, size=s).astype("float32")
              for i, s in enumerate(SHAPES)}
    arrays["w5"] = np.abs(arrays["w5"]) + 0.5  # BatchNorm's moving variance
    arrays["x"] = rng.normal(size=(4, 8, 8, 1)).astype("float32")
    arrays["y"] = np.array([0, 2, 1, 1], dtype="int32")
    for i, s in enumerate([(6, 5), (5,), (5, 2), (2,)]):
        arrays[f"m{i}"] = rng.normal(scale=0.5, size=s).astype("float32")
    arrays["mx"] = rng.normal(size=(8, 6)).astype("float32")
    arrays["my"] = rng.normal(size=(8, 2)).astype("float32")
    np.savez(path, **arrays)


_RESULTS: dict[str, tuple[dict, dict]] = {}


def run_backend(backend: str, tmp_path_factory) -> tuple[dict, dict]:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed (`make test` installs it)")
    if backend not in _RESULTS:
        out = str(tmp_path_factory.mktemp(f"grad_{backend}"))
        inputs = os.path.join(out, "inputs.npz")
        _inputs(inputs)
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
                   CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", SCRIPT, out,
                               inputs], env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"{backend} subprocess failed:\n{proc.stderr[-4000:]}"
        with open(os.path.join(out, "report.json")) as f:
            report = json.load(f)
        _RESULTS[backend] = (report, dict(np.load(os.path.join(out, "arrays.npz"))))
    return _RESULTS[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_on_each_backend(backend, tmp_path_factory):
    report, arrays = run_backend(backend, tmp_path_factory)
    assert report["backend"] == backend
    assert report["weights_unchanged"]
    assert report["fd_max_error"] <= 1e-3 * report["fd_scale"]
    assert report["sgd_max_error"] <= 1e-5 * report["sgd_scale"]
    assert report["tensorflow_imported"] is (backend == "tensorflow")
    assert report["mixed_dtypes"] == ["float32"]
    assert report["mixed_max_error"] <= 2e-2 * report["sgd_scale"]  # float16 precision
    assert report["two_expected"]
    assert report["subclassed_input"]
    assert "subclassed model" in report["subclassed_layer_error"]
    assert report["uncompiled_loss_error"].endswith("Received: model.loss=None")
    assert sorted(k for k in arrays if k.startswith("grad/")) == sorted(
        f"grad/{k}" for k in ("conv/kernel", "conv/bias", "bn/gamma", "bn/beta",
                              "dense/kernel", "dense/bias", "logits/kernel", "logits/bias"))


def test_same_weights_same_gradients_on_every_backend(tmp_path_factory):
    found = [b for b in BACKENDS if importlib.util.find_spec(b) is not None]
    if len(found) < 2:
        pytest.skip("needs at least two backends installed")
    results = {b: run_backend(b, tmp_path_factory) for b in found}
    ref_report, ref = results[found[0]]
    for backend in found[1:]:
        report, arrays = results[backend]
        assert report["units"] == ref_report["units"], backend
        assert report["loss"] == pytest.approx(ref_report["loss"], rel=1e-5)
        assert sorted(arrays) == sorted(ref)
        for key, want in ref.items():
            got = arrays[key]
            assert got.shape == want.shape, (backend, key)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 1e-12, (backend, key)
