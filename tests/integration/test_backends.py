"""Every Keras backend: snapshots, views, dtypes, and no TensorFlow import on JAX/PyTorch.

Each backend runs in its own subprocess with `KERAS_BACKEND` set (a process
picks its Keras backend once). The subprocess fits tiny models with every
WeightWatch view on, records `model.get_weights()` with an independent
callback, and reports back in a JSON file; this process reads the run
directories with `load_run` and the event files with TensorBoard's own
reader. One subprocess per backend, shared by the tests of that backend.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_same_arrays

from keras_weightwatch import load_run, verify_run
from keras_weightwatch.summaries import RESPONSES, kernel_tag, response_tag, saliency_tag

pytestmark = pytest.mark.slow

BACKENDS = ("tensorflow", "jax", "torch")
_PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
TIMEOUT_S = 300

# Runs first in every subprocess (also those of test_distributed.py): a tiny CNN,
# fixed weights, data, an independent get_weights() recorder. Seeds come from
# `random`, numpy and torch's own generator: keras.utils.set_random_seed would
# import TensorFlow. `out` (sys.argv[1]) is where the subprocess writes.
PRELUDE = r'''
import json, os, random, sys, warnings
import numpy as np

out = sys.argv[1]
random.seed(0)
np.random.seed(0)
import keras

FRAMEWORKS = ("tensorflow", "jax", "torch")
# Keras itself imports JAX whenever it is installed (keras.callbacks imports its Orbax
# checkpoint callback); WeightWatch must add no framework to what Keras imports.
frameworks_with_keras = sorted(m for m in FRAMEWORKS if m in sys.modules)
backend = keras.backend.backend()
if backend == "torch":
    import torch
    torch.manual_seed(0)

from keras_weightwatch import WeightWatch, load_run
from keras_weightwatch.capture import capture_arrays

H = W = 8
N_FEATURES = 6 * 6 * 2  # Flatten of conv's (6, 6, 2) output feeds `dense`
FEATURE_NAMES = [f"px{i}" for i in range(N_FEATURES)]


def cnn(dtype=None):
    return keras.Sequential(
        [
            keras.Input((H, W, 1)),
            keras.layers.Conv2D(2, 3, activation="relu", name="conv", dtype=dtype),
            keras.layers.Flatten(name="flat", dtype=dtype),
            keras.layers.Dense(3, activation="relu", name="dense", dtype=dtype),
            keras.layers.Dense(2, name="head", dtype=dtype),
        ],
        name="cnn",
    )


def fixed_weights(model):
    """The same values on every backend, in each weight's own dtype."""
    rng = np.random.default_rng(123)
    return [rng.normal(scale=0.3, size=w.shape).astype(w.dtype) for w in model.get_weights()]


rng = np.random.default_rng(1)
x = rng.normal(size=(16, H, W, 1)).astype("float32")
y = rng.integers(0, 2, size=(16,)).astype("int32")


class Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_train_begin(self, logs=None):
        self.weights["initial"] = [np.array(w, copy=True) for w in self.model.get_weights()]

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = [np.array(w, copy=True) for w in self.model.get_weights()]


def mismatches(run_dir, recorded):
    """Keys whose stored array differs from get_weights() in value, dtype or bytes."""
    run = load_run(run_dir)
    bad = []
    for step, expected in recorded.items():
        got = run.weights(step)
        if len(got) != len(expected):
            bad.append(f"{step}: {len(got)} arrays, expected {len(expected)}")
            continue
        for (key, a), b in zip(got.items(), expected):
            b = np.asarray(b)
            if a.shape != b.shape or a.dtype != b.dtype or a.tobytes() != b.tobytes():
                bad.append(f"{step}/{key}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
    return bad


def fit(model, callbacks, epochs):
    """Fit from fixed_weights(); return what an independent recorder saw."""
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.set_weights(fixed_weights(model))
    rec = Recorder()
    model.fit(x, y, epochs=epochs, batch_size=8, shuffle=False, verbose=0,
              callbacks=[*callbacks, rec])
    return rec.weights


report = {"backend": backend, "frameworks_with_keras": frameworks_with_keras}
'''

SCRIPT = PRELUDE + r'''
caught = warnings.catch_warnings(record=True)
caught_list = caught.__enter__()
warnings.simplefilter("always")
# The suite's own filters (pyproject.toml): third-party deprecations are not ours to fix.
for module in ("tensorflow", "keras", "google", "tensorboard", "jax", "flatbuffers", "h5py"):
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=module + r"\.")

# 1. A CNN with every view on; two callbacks, one per response mode.
views = dict(
    histograms=True,
    kernel_images=True,
    feature_names=FEATURE_NAMES,
    top_k=3,
    feature_layer="dense",
    sample_images=x[:2],
)
model = cnn()
kernel_dir, act_dir = os.path.join(out, "cnn_kernel"), os.path.join(out, "cnn_activation")
recorded = fit(
    model,
    [
        WeightWatch(kernel_dir, response_mode="kernel", **views),
        WeightWatch(act_dir, response_mode="activation", **views),
    ],
    epochs=2,
)
report["cnn_mismatches"] = mismatches(kernel_dir, recorded) + mismatches(act_dir, recorded)
report["weight_paths"] = [w.path for w in model.weights]

# 2. The copy a snapshot takes is not changed by training (PyTorch on CPU shares storage).
copies = capture_arrays(model)
reference = [np.array(w, copy=True) for w in model.get_weights()]
model.train_on_batch(x[:8], y[:8])
report["training_changed_weights"] = any(
    not np.array_equal(a, b) for a, b in zip(reference, model.get_weights())
)
report["capture_unchanged"] = all(a.tobytes() == b.tobytes() for a, b in zip(copies, reference))
if backend == "torch":
    # Should a variable ever hand out a view of the parameter's storage (as
    # torch.Tensor.numpy() does on CPU), the snapshot must still be a copy.
    from keras_weightwatch.capture import _host_copy

    storage = torch.ones(3)

    class SharesStorage:
        def numpy(self):
            return storage.numpy()

    copy = _host_copy(SharesStorage())
    shared = SharesStorage().numpy()
    storage.add_(1.0)  # an in-place update, like a torch optimizer step
    report["storage_view_changes"] = bool((shared == 2.0).all())
    report["host_copy_of_storage_view_unchanged"] = bool((copy == 1.0).all())

# 3. bfloat16 variables, and a mixed_float16 policy (float32 variables, float16 compute).
bf16_dir = os.path.join(out, "bfloat16")
report["bf16_mismatches"] = mismatches(bf16_dir, fit(cnn("bfloat16"), [WeightWatch(bf16_dir)], 1))
keras.mixed_precision.set_dtype_policy("mixed_float16")
mixed = cnn()
report["mixed_compute_dtype"] = mixed.get_layer("conv").compute_dtype
mixed_dir = os.path.join(out, "mixed_float16")
report["mixed_mismatches"] = mismatches(mixed_dir, fit(mixed, [WeightWatch(mixed_dir)], 1))
keras.mixed_precision.set_dtype_policy("float32")

# 4. Gradient statistics and saliency maps, from the same fixed weights on every backend.
grad_dir = os.path.join(out, "gradients")
fit(cnn(), [WeightWatch(grad_dir, kernel_images=False, histograms=False, sample_images=x[:2],
                        saliency=["vanilla", "gradcam", "hirescam"],
                        gradient_data=(x[:8], y[:8]))], 1)
grad_run = load_run(grad_dir)
report["grad_stats"] = {k: {s: v for s, v in st.items() if s.startswith("grad_")}
                        for k, st in grad_run.snapshot("initial").stats.items()}

report["tensorflow_imported"] = "tensorflow" in sys.modules
report["frameworks_imported"] = sorted(m for m in FRAMEWORKS if m in sys.modules)
caught.__exit__(None, None, None)
report["warnings"] = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})"
                      for w in caught_list]
with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f)
'''


def _available(backend: str) -> bool:
    return importlib.util.find_spec(_PACKAGES[backend]) is not None


_RESULTS: dict[str, tuple[str, dict]] = {}


def run_backend(backend: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    """Run SCRIPT once per backend (cached for the module); return (out dir, report)."""
    if not _available(backend):
        pytest.skip(f"{backend} is not installed (`make test` installs it)")
    if backend not in _RESULTS:
        out = str(tmp_path_factory.mktemp(f"backend_{backend}"))
        env = dict(os.environ)
        env.update(
            KERAS_BACKEND=backend,
            TF_CPP_MIN_LOG_LEVEL="3",
            CUDA_VISIBLE_DEVICES="",
            JAX_PLATFORMS="cpu",
        )
        env.pop("XLA_FLAGS", None)
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, out],
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        assert proc.returncode == 0, f"{backend} subprocess failed:\n{proc.stderr[-4000:]}"
        with open(os.path.join(out, "report.json")) as f:
            _RESULTS[backend] = (out, json.load(f))
    return _RESULTS[backend]


def event_values(run_dir: str) -> dict[str, dict[int, bytes]]:
    """Tag -> {step: the tensor's serialized content}, as TensorBoard's own reader loads it."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea

    acc = pea.EventAccumulator(os.path.join(run_dir, "weights"), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    out: dict[str, dict[int, bytes]] = {}
    for t in acc.Tags()["tensors"]:
        events = acc.Tensors(t)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{t}: a step written twice: {steps}"
        out[t] = {e.step: e.tensor_proto.SerializeToString() for e in events}
    return out


KEYS = ["conv/kernel", "conv/bias", "dense/kernel", "dense/bias", "head/kernel", "head/bias"]
STATS = ("l2_norm", "mean", "std", "max_abs")  # no NaN/Inf: no nan_count, inf_count charts


GROUP = "cnn"  # the model's name: its image tags' group
KERNEL_IMAGE = kernel_tag(GROUP, "conv/kernel", 0, 1)  # its one convolution kernel


def expected_tags(n_samples: int = 2) -> dict[str, list[int]]:
    """Tag -> steps of a 2-epoch fit of the CNN with every view on (written out by hand)."""
    every = [-1, 0, 1]
    tags = {f"{k}/{s}": every for k in KEYS for s in STATS}
    tags |= {f"{k}/update_ratio": [0, 1] for k in KEYS}  # needs a previous snapshot
    tags |= {f"{k}/histogram": every for k in KEYS}
    tags[KERNEL_IMAGE] = every
    tags["features/dense"] = every
    tags |= {f"features/dense/px{i}": every for i in range(6 * 6 * 2)}
    tags |= {response_tag(GROUP, "conv", i): every for i in range(n_samples)}
    tags |= {t: every for t in ("health/findings", "health/errors", "health/warnings")}
    return tags


@pytest.mark.parametrize("backend", BACKENDS)
def test_snapshots_equal_get_weights(backend, tmp_path_factory):
    out, report = run_backend(backend, tmp_path_factory)
    assert report["backend"] == backend
    assert report["cnn_mismatches"] == []
    for name in ("cnn_kernel", "cnn_activation"):
        run = load_run(os.path.join(out, name))
        assert run.steps == [-1, 0, 1]
        assert verify_run(run.path).ok
        assert list(run.weights(1)) == KEYS


@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_is_a_copy_training_cannot_change(backend, tmp_path_factory):
    _, report = run_backend(backend, tmp_path_factory)
    assert report["training_changed_weights"]
    assert report["capture_unchanged"]
    if backend == "torch":
        assert report["storage_view_changes"]  # the hazard is real...
        assert report["host_copy_of_storage_view_unchanged"]  # ...and the copy avoids it


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tensorflow_import_on_jax_and_torch(backend, tmp_path_factory):
    _, report = run_backend(backend, tmp_path_factory)
    assert report["tensorflow_imported"] is (backend == "tensorflow")
    # No framework beyond the backend and what `import keras` imports by itself.
    assert set(report["frameworks_imported"]) == {backend, *report["frameworks_with_keras"]}
    assert "torch" not in report["frameworks_imported"] or backend == "torch"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_warnings(backend, tmp_path_factory):
    """The fits with every view on warn about nothing (the suite runs with warnings as errors)."""
    _, report = run_backend(backend, tmp_path_factory)
    assert report["warnings"] == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_and_mixed_float16_keep_their_dtype(backend, tmp_path_factory):
    out, report = run_backend(backend, tmp_path_factory)
    assert report["bf16_mismatches"] == []
    assert report["mixed_mismatches"] == []
    assert report["mixed_compute_dtype"] == "float16"

    bf16 = load_run(os.path.join(out, "bfloat16"))
    assert {s.dtype for s in bf16.specs} == {"bfloat16"}
    for rec in bf16.snapshot(0).tensors.values():
        assert (rec.dtype, rec.stored_dtype, rec.lossy) == ("bfloat16", "bfloat16", False)
    w = bf16.weights(0)["conv/kernel"]
    assert w.dtype.name == "bfloat16"
    # On disk: the raw 16 bits, readable by plain numpy without ml_dtypes.
    rec = bf16.snapshot(0).tensors["conv/kernel"]
    raw = np.load(os.path.join(bf16.path, rec.file))
    assert raw.dtype == np.uint16 and raw.tobytes() == w.tobytes()
    assert verify_run(bf16.path).ok

    mixed = load_run(os.path.join(out, "mixed_float16"))
    assert {s.dtype for s in mixed.specs} == {"float32"}  # variables stay float32
    assert all(not r.lossy for r in mixed.snapshot(0).tensors.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_event_tags(backend, tmp_path_factory):
    out, _ = run_backend(backend, tmp_path_factory)
    for name in ("cnn_kernel", "cnn_activation"):
        values = event_values(os.path.join(out, name))
        assert {t: sorted(v) for t, v in values.items()} == expected_tags(), name


def _installed() -> list[str]:
    found = [b for b in BACKENDS if _available(b)]
    if len(found) < 2:
        pytest.skip("needs at least two backends installed")
    return found


def test_same_weights_same_snapshot_on_every_backend(tmp_path_factory):
    """Identical weights (set with set_weights) give identical snapshot files on every backend."""
    found = _installed()
    hashes: dict[str, dict[str, dict[str, str]]] = {}
    for backend in found:
        out, _ = run_backend(backend, tmp_path_factory)
        for name in ("cnn_kernel", "bfloat16", "mixed_float16"):
            run = load_run(os.path.join(out, name))
            hashes.setdefault(name, {})[backend] = {
                k: r.sha256 for k, r in run.snapshot("initial").tensors.items()
            }
    for name, per_backend in hashes.items():
        first = per_backend[found[0]]
        assert sorted(first) == sorted(KEYS), name
        for backend in found[1:]:
            assert per_backend[backend] == first, (name, backend)
    # And they hold the values that were set, bit for bit.
    out, _ = run_backend(found[0], tmp_path_factory)
    run = load_run(os.path.join(out, "cnn_kernel"))
    rng = np.random.default_rng(123)
    expected = [rng.normal(scale=0.3, size=s.shape).astype("float32") for s in run.specs]
    assert_same_arrays(run.weights("initial"), expected)


def test_same_weights_same_views_on_every_backend(tmp_path_factory):
    """At the initial step every summary (stats, histograms, table, images) is the same bytes.

    Activation responses are left out: they come from each backend's own
    forward pass, whose float rounding may differ.
    """
    found = _installed()
    initial = {}
    for backend in found:
        out, _ = run_backend(backend, tmp_path_factory)
        for name in ("cnn_kernel", "cnn_activation"):
            values = event_values(os.path.join(out, name))
            initial[backend, name] = {
                t: v[-1]
                for t, v in values.items()
                if -1 in v and not (name == "cnn_activation" and f"/{RESPONSES}/" in t)
            }
    for name in ("cnn_kernel", "cnn_activation"):
        first = initial[found[0], name]
        assert KERNEL_IMAGE in first and "features/dense" in first
        for backend in found[1:]:
            assert initial[backend, name] == first, (name, backend)


def test_gradient_stats_and_saliency_agree_across_backends(tmp_path_factory):
    reports = {b: run_backend(b, tmp_path_factory) for b in BACKENDS}
    ref = reports[BACKENDS[0]][1]["grad_stats"]
    assert set(ref) == set(KEYS) and all("grad_norm" in v for v in ref.values())
    for backend, (out, report) in reports.items():
        got = report["grad_stats"]
        for key in KEYS:
            for stat, value in ref[key].items():
                assert got[key][stat] == pytest.approx(value, rel=1e-5), (backend, key, stat)
        tags = event_values(os.path.join(out, "gradients"))
        want = {saliency_tag(GROUP, m, i) for m in ("vanilla", "gradcam", "hirescam")
                for i in range(2)} | {f"{k}/grad_norm" for k in KEYS}
        assert want <= set(tags), backend
