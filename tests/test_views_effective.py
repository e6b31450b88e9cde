"""Every view on a LoRA or quantized layer shows the kernel the layer computes with: real fits,
the event files read back with TensorBoard's reader, compared to the pure functions applied to
`run.weights(step, effective=True)`, which is checked against `layer.kernel` (LoRA) or Keras's
own dequantization (quantized layers)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from derive_helpers import dense_reference, einsum_reference
from helpers import assert_same_arrays
from scipy.signal import correlate2d
from view_helpers import (
    STATS,
    _acc,
    _image,
    _images,
    _kernel_tags,
    _response_tag,
    _values,
)

from keras_weightwatch import WeightWatch, load_run
from keras_weightwatch.capture import describe_model
from keras_weightwatch.histograms import histogram
from keras_weightwatch.images import kernel_grid, response_grid
from keras_weightwatch.responses import Geometry
from keras_weightwatch.spectral import tensor_spectral
from keras_weightwatch.stats import tensor_stats
from keras_weightwatch.summaries import tag


class _Kernels(keras.callbacks.Callback):
    """The independent reference: what each named layer computes with (`layer.kernel`,
    `layer.embeddings`, or Keras's dequantization), and `get_weights()`, at train begin and at
    each epoch end."""

    def __init__(self, refs):
        super().__init__()
        self.refs = refs  # layer name -> function(layer) -> the kernel it computes with
        self.kernels: dict[int, dict[str, np.ndarray]] = {}
        self.weights: dict[int, list[np.ndarray]] = {}

    def _record(self, step):
        self.kernels[step] = {
            n: keras.ops.convert_to_numpy(f(self.model.get_layer(n))).astype("float32")
            for n, f in self.refs.items()}
        self.weights[step] = [np.array(w, copy=True) for w in self.model.get_weights()]

    def on_train_begin(self, logs=None):
        self._record(-1)

    def on_epoch_end(self, epoch, logs=None):
        self._record(epoch)


def _lora_kernel(layer):
    return layer.embeddings if isinstance(layer, keras.layers.Embedding) else layer.kernel


def _enable_lora(model, names, seed=0):
    """LoRA on each named layer, its B set to random values (so A @ B moves the kernel)."""
    rng = np.random.default_rng(seed)
    for name in names:
        layer = model.get_layer(name)
        layer.enable_lora(2)
        b = layer.lora_embeddings_b if isinstance(layer, keras.layers.Embedding) \
            else layer.lora_kernel_b
        b.assign(rng.normal(scale=0.3, size=tuple(b.shape)).astype("float32"))
    return {n: _lora_kernel for n in names}


def _image_model():
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, name="conv")(inp)
    h = keras.layers.Flatten()(h)
    h = keras.layers.EinsumDense("ab,bc->ac", 6, name="ein")(h)
    out = keras.layers.Dense(2, name="out")(h)
    return keras.Model(inp, out), ("conv", "ein", "out")


def _token_model():
    inp = keras.Input((4,), dtype="int32")
    h = keras.layers.Embedding(20, 6, name="emb")(inp)
    h = keras.layers.EinsumDense("abc,cd->abd", (4, 5), name="ein3")(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(1, name="out")(h)
    return keras.Model(inp, out), ("emb", "ein3", "out")


def _fit(model, run, refs, x, y, lr=0.05, epochs=2, **kwargs):
    recorder = _Kernels(refs)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    model.fit(x, y, epochs=epochs, batch_size=8, verbose=0,
              callbacks=[WeightWatch(run, **kwargs), recorder])
    return recorder


def _data(model, seed=1):
    rng = np.random.default_rng(seed)
    shape = (16, *model.input_shape[1:])
    if model.inputs[0].dtype.startswith("int"):
        x = rng.integers(0, 20, size=shape).astype("int32")
    else:
        x = rng.random(shape).astype("float32")
    return x, rng.random((16, *model.output_shape[1:])).astype("float32")


def _key(model, layer_name):
    layer = model.get_layer(layer_name)
    var = layer._embeddings if isinstance(layer, keras.layers.Embedding) else layer._kernel
    info = describe_model(model)
    return {id(v): s.key for v, s in zip(model.weights, info.weights)}[id(var)]


def _scalar(acc, key, name, step):
    return float(_values(acc, tag(key, name))[step])


def _check_stats_and_histograms(run, acc, keys):
    """Every derived key's scalars, histogram and stored statistics are those of the effective
    kernel of `run.weights(step, effective=True)` (update ratio against the previous one)."""
    prev = None
    for snap in run.snapshots:
        eff = run.weights(snap.step, effective=True)
        for key in keys:
            want = tensor_stats(eff[key], None if prev is None else prev[key])
            for name in STATS:
                if name == "update_ratio" and prev is None:
                    continue
                assert _scalar(acc, key, name, snap.step) == pytest.approx(
                    float(np.float32(want[name])), rel=1e-6), (key, name, snap.step)
                assert snap.stats[key][name] == pytest.approx(want[name], rel=1e-9)
            hist = _values(acc, tag(key, "histogram"))[snap.step]
            np.testing.assert_allclose(hist, histogram(eff[key]), rtol=1e-12)
        prev = eff


def _check_effective_is_the_layers(run, model, recorder, names):
    for snap in run.snapshots:
        eff = run.weights(snap.step, effective=True)
        for name in names:
            key = _key(model, name)
            np.testing.assert_allclose(eff[key], recorder.kernels[snap.step][name],
                                       rtol=1e-6, atol=1e-6)
            # the adapters (or the scale) matter: the stored kernel is not the effective one
            assert not np.allclose(run.tensor(key, snap.step), eff[key], atol=1e-4), (name, snap)
        assert_same_arrays(run.weights(snap.step), recorder.weights[snap.step])


@pytest.mark.parametrize("make", [_image_model, _token_model], ids=["image", "token"])
def test_lora_statistics_histograms_and_spectral_are_the_effective_kernels(tmp_path, make):
    model, names = make()
    refs = _enable_lora(model, names)
    run_dir = str(tmp_path / "run")
    x, y = _data(model)
    recorder = _fit(model, run_dir, refs, x, y, spectral_freq=1)
    run, acc = load_run(run_dir), _acc(run_dir)
    keys = [_key(model, n) for n in names]
    assert [d.key for d in run.derived] == keys
    _check_effective_is_the_layers(run, model, recorder, names)
    _check_stats_and_histograms(run, acc, keys)
    measured = 0
    for snap in run.snapshots:
        eff = run.weights(snap.step, effective=True)
        for key, name in zip(keys, names):
            cls = type(model.get_layer(name)).__name__
            want = tensor_spectral(eff[key], cls)
            if want is None:  # no matrices in this kernel: no spectral metrics
                continue
            measured += 1
            for metric in ("spectral_norm", "stable_rank", "log_norm"):
                assert _scalar(acc, key, metric, snap.step) == pytest.approx(
                    getattr(want, metric), rel=1e-5), (key, metric)
                assert snap.stats[key][metric] == pytest.approx(getattr(want, metric),
                                                                rel=1e-9)
    assert measured >= len(run.snapshots)


@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16"])
def test_a_lora_layer_computing_in_bfloat16_shows_its_rounded_kernel(tmp_path, policy):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="d", dtype=policy),
                              keras.layers.Dense(1, name="out")])
    refs = _enable_lora(model, ["d"])
    run_dir = str(tmp_path / "run")
    x, y = _data(model)
    recorder = _fit(model, run_dir, refs, x, y)
    run = load_run(run_dir)
    _check_effective_is_the_layers(run, model, recorder, ["d"])
    _check_stats_and_histograms(run, _acc(run_dir), ["d/kernel"])
    for snap in run.snapshots:  # bfloat16 values, exactly those of layer.kernel
        np.testing.assert_array_equal(run.tensor("d/kernel", snap.step, effective=True),
                                      recorder.kernels[snap.step]["d"])


def test_lora_conv_gets_its_effective_kernel_grid_that_moves_while_the_base_is_frozen(tmp_path):
    model, names = _image_model()
    refs = _enable_lora(model, ["conv"])
    run_dir = str(tmp_path / "run")
    x, y = _data(model)
    recorder = _fit(model, run_dir, refs, x, y, lr=0.1, epochs=2)
    run, acc = load_run(run_dir), _acc(run_dir)
    _check_effective_is_the_layers(run, model, recorder, ["conv"])
    name = _kernel_tags(model, ["conv/kernel"])["conv/kernel"]
    images = {}
    for snap in run.snapshots:
        eff = run.tensor("conv/kernel", snap.step, effective=True)
        images[snap.step] = _image(acc, name, snap.step)
        np.testing.assert_array_equal(images[snap.step], kernel_grid(eff).image)
    # the base is frozen: one stored tensor, the same file at every snapshot
    digests = {s.tensors["conv/kernel"].digest for s in run.snapshots}
    assert len(digests) == 1
    assert len({s.tensors["conv/lora_kernel_a"].digest for s in run.snapshots}) == 3
    assert not np.array_equal(images[-1], images[1])  # yet the grid moves


def _scipy_responses(images, kernel):
    return np.stack([np.stack([sum(correlate2d(im[..., c], kernel[..., c, o], mode="valid")
                                   for c in range(im.shape[-1]))
                               for o in range(kernel.shape[-1])], axis=-1) for im in images])


def test_responses_of_a_lora_first_conv_use_the_effective_kernel(tmp_path):
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(2, name="out")])
    refs = _enable_lora(model, ["conv"], seed=3)
    samples = _images(2, seed=5)
    run_dir = str(tmp_path / "run")
    x, y = _data(model)
    recorder = _fit(model, run_dir, refs, x, y, sample_images=samples)
    acc = _acc(run_dir)
    for step in (-1, 1):
        kernel = recorder.kernels[step]["conv"].astype(np.float64)
        base = recorder.weights[step][0].astype(np.float64)  # conv/kernel, the frozen base
        for i in range(2):
            img = _image(acc, _response_tag(model, "conv", i), step)
            want = response_grid(samples[i], _scipy_responses(samples, kernel)[i],
                                 geometry=Geometry((3, 3))).image
            assert np.abs(img.astype(int) - want).max() <= 1
            of_base = response_grid(samples[i], _scipy_responses(samples, base)[i],
                                    geometry=Geometry((3, 3))).image
            assert np.abs(img.astype(int) - of_base).max() > 8  # not the base's responses


_NAMES = ["a", "b", "c", "d"]


def _table_ranks(acc, step, layer="d"):
    lines = _values(acc, f"features/{layer}")[step].item().decode().splitlines()
    return [line.split("|")[2].strip() for line in lines if line.startswith("| ") and
            line.split("|")[1].strip().isdigit()]


def test_top_k_of_a_lora_first_dense_ranks_by_the_effective_kernel(tmp_path):
    """A fine-tune that swaps which features matter swaps the table."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, name="d")])
    layer = model.get_layer("d")
    layer.kernel.assign(np.array([[3.0], [2.0], [1.0], [0.5]], "float32"))
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = np.zeros((16, 1), "float32")
    before = str(tmp_path / "before")
    _fit(model, before, {}, x, y, lr=0.0, epochs=1, feature_names=_NAMES, top_k=4)
    assert _table_ranks(_acc(before), 0) == ["a", "b", "c", "d"]

    layer.enable_lora(1)
    layer.lora_kernel_a.assign(np.array([[-1.0], [0.0], [0.0], [1.0]], "float32"))
    layer.lora_kernel_b.assign(np.array([[3.5]], "float32"))  # effective: [-0.5, 2, 1, 4]
    after = str(tmp_path / "after")
    recorder = _fit(model, after, {"d": _lora_kernel}, x, y, lr=0.0, epochs=1,
                    feature_names=_NAMES, top_k=4)
    acc = _acc(after)
    effective = recorder.kernels[0]["d"][:, 0]
    np.testing.assert_allclose(effective, [-0.5, 2.0, 1.0, 4.0], rtol=1e-6)
    for step in (-1, 0):
        assert _table_ranks(acc, step) == ["d", "b", "c", "a"]
        for n, w in zip(_NAMES, effective):
            assert float(_values(acc, f"features/d/{n}")[step]) == pytest.approx(float(w))
    np.testing.assert_array_equal(load_run(after).tensor("d/kernel", 0),
                                  np.array([[3.0], [2.0], [1.0], [0.5]], "float32"))


# -- quantized layers

_INT4_PER_CHANNEL = keras.quantizers.Int4QuantizationConfig(block_size=-1)
_INT4_GROUPED = keras.quantizers.Int4QuantizationConfig(block_size=4)


@pytest.mark.parametrize(
    ("mode", "config"),
    [("int8", None), ("int4", None), ("int4", _INT4_PER_CHANNEL), ("int4", _INT4_GROUPED),
     ("float8", None)],
    ids=["int8", "int4-default", "int4-per-channel", "int4-grouped", "float8"],
)
def test_quantized_views_are_kerass_dequantized_kernel_and_snapshots_stay_exact(
        tmp_path, mode, config):
    inp = keras.Input((3, 8))
    h = keras.layers.EinsumDense("abc,cde->abde", (3, 2, 5), bias_axes="de", name="ein")(inp)
    h = keras.layers.Reshape((30,))(h)
    h = keras.layers.Dense(7, name="dense")(h)
    out = keras.layers.Dense(1, name="out")(h)
    model = keras.Model(inp, out)
    for name in ("ein", "dense"):
        model.get_layer(name).quantize(mode, config=config)
        if mode == "float8":
            model.get_layer(name).kernel_scale.assign(np.float32(0.02))
    refs = {"ein": einsum_reference, "dense": dense_reference}
    run_dir = str(tmp_path / "run")
    x, y = _data(model)
    recorder = _fit(model, run_dir, refs, x, y, lr=0.01, spectral_freq=1)
    run, acc = load_run(run_dir), _acc(run_dir)
    keys = ["ein/kernel", "dense/kernel"]
    assert [(d.key, d.rule) for d in run.derived] == [(k, mode) for k in keys]
    for snap in run.snapshots:
        # snapshots bit-exact, dtypes kept (int8 codes for int8 and int4)
        assert_same_arrays(run.weights(snap.step), recorder.weights[snap.step])
        eff = run.weights(snap.step, effective=True)
        for key, name in zip(keys, ("ein", "dense")):
            np.testing.assert_allclose(eff[key], recorder.kernels[snap.step][name],
                                       rtol=1e-6, atol=1e-7)
            if mode != "float8":
                assert run.tensor(key, snap.step).dtype == np.int8
    _check_stats_and_histograms(run, acc, keys)
    eff = run.weights("last", effective=True)
    want = tensor_spectral(eff["dense/kernel"], "Dense")
    assert _scalar(acc, "dense/kernel", "spectral_norm", run.snapshots[-1].step) == \
        pytest.approx(want.spectral_norm, rel=1e-5)
