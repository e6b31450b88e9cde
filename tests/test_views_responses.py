"""views.responses: responses of sample images to kernels, against scipy and a sub-model."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import invert_diverging
from scipy.signal import correlate2d
from view_helpers import (
    _acc,
    _cnn,
    _fit,
    _image,
    _images,
    _response_tag,
    _values,
    cb_views,
)

from keras_weightwatch import WeightWatch
from keras_weightwatch.images import response_grid
from keras_weightwatch.responses import Geometry
from keras_weightwatch.views import ResponseView

VALID_3X3 = Geometry((3, 3))  # the geometry of `_cnn`'s conv layer


def _scipy_responses(images, kernel):
    return np.stack(
        [
            np.stack(
                [
                    sum(
                        correlate2d(im[..., c], kernel[..., c, o], mode="valid")
                        for c in range(im.shape[-1])
                    )
                    for o in range(kernel.shape[-1])
                ],
                axis=-1,
            )
            for im in images
        ]
    )


def test_kernel_responses_equal_scipy_correlation(tmp_path, recorder):
    model = _cnn(filters=4, channels=3, activation="relu")
    samples = _images(2, channels=3, seed=5)
    run = str(tmp_path / "run")
    pngs = tmp_path / "pngs"
    cb = WeightWatch(run, sample_images=samples, responses_dir=pngs)
    _fit(model, cb, extra=[recorder])
    acc = _acc(run)
    view = next(v for v in cb_views(cb, model) if isinstance(v, ResponseView))
    for step, weights in ((-1, recorder.initial), (1, recorder.epochs[1])):
        ref = _scipy_responses(samples, weights[0].astype(np.float64))
        snap = type("S", (), {"arrays": {"conv/kernel": weights[0]}})()
        np.testing.assert_allclose(view.responses(snap, None)["conv"], ref, rtol=1e-6, atol=1e-6)
        for i in range(2):
            img = _image(acc, _response_tag(model, "conv", i), step)
            expected = response_grid(samples[i], ref[i], geometry=VALID_3X3).image
            assert np.abs(img.astype(int) - expected).max() <= 1
            with open(pngs / "conv" / f"sample_{i}" / f"step_{step}.png", "rb") as f:
                assert f.read() == _values(acc, _response_tag(model, "conv", i))[step][2]


def test_a_planted_edge_kernel_in_a_strided_7x7_first_layer_lights_up_the_images_edges(tmp_path):
    model = keras.Sequential([keras.Input((32, 32, 3)),
                              keras.layers.Conv2D(3, 7, strides=2, padding="same", name="conv1"),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    rng = np.random.default_rng(11)
    kernel = rng.normal(size=(7, 7, 3, 3)).astype("float32") * 0.1
    kernel[:, :3, :, 0], kernel[:, 3, :, 0], kernel[:, 4:, :, 0] = -1.0, 0.0, 1.0
    model.get_layer("conv1").set_weights([kernel, np.zeros(3, "float32")])
    samples = (0.1 * rng.random((1, 32, 32, 3))).astype("float32")
    samples[:, :, 10:22] += 0.8  # vertical edges between columns 9|10 and 21|22
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run, sample_images=samples, kernel_images=False), epochs=1, lr=0.0)
    acc = _acc(run)
    img = _image(acc, _response_tag(model, "conv1", 0), -1)
    assert img.shape == (34, 4 * 33 + 1, 3)  # image + 3 tiles, each 32 x 32 px, one px apart
    tile = invert_diverging(img[1:33, 34:66])  # the tile after the image
    full = sum(correlate2d(samples[0, :, :, c], kernel[:, :, c, 0], mode="same") for c in range(3))
    strided = full[1::2, 1::2]  # a stride-2 'same' output o is centred on input 2o + 1
    dev = strided - strided.mean()
    want = np.repeat(np.repeat(dev / np.abs(dev).max(), 2, axis=0), 2, axis=1)
    np.testing.assert_allclose(tile, want, atol=0.03)  # drawn at the input's 32 x 32 pixels
    lit = set(np.flatnonzero(np.abs(tile).mean(axis=0) > 0.5))
    assert lit and all(min(abs(c - 9.5), abs(c - 21.5)) < 3 for c in lit)
    desc = acc.SummaryMetadata(_response_tag(model, "conv1", 0)).summary_description
    assert "drawn at the image's 32x32 pixels (the 16x16 output, stride 2x2" in desc
    assert "on its own scale: white is the tile's mean" in desc


def test_activation_responses_equal_a_sub_model_output(tmp_path):
    model = _cnn(filters=3, activation="relu")
    samples = _images(2, seed=6)
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run, sample_images=samples, response_mode="activation"))
    sub = keras.Model(model.inputs[0], model.get_layer("conv").output)
    ref = keras.ops.convert_to_numpy(sub(samples))
    view = next(
        v
        for v in cb_views(
            WeightWatch(run, sample_images=samples, response_mode="activation"), model
        )
        if isinstance(v, ResponseView)
    )
    np.testing.assert_allclose(view.capture(model)["conv"], ref, rtol=1e-6)
    assert ref.min() >= 0  # relu: the layer's output, not the plain correlation
    acc = _acc(run)
    for i in range(2):
        img = _image(acc, _response_tag(model, "conv", i), 1)
        expected = response_grid(samples[i], ref[i], geometry=VALID_3X3).image
        assert np.abs(img.astype(int) - expected).max() <= 1


def test_kernel_responses_of_a_deeper_layer_use_its_input(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Rescaling(2.0, name="scale"),
            keras.layers.Conv2D(2, 3, padding="same", name="c"),
            keras.layers.Flatten(),
            keras.layers.Dense(1),
        ]
    )
    samples = _images(1, seed=7)
    cb = WeightWatch(tmp_path / "run", sample_images=samples, response_layers=["c"])
    view = next(v for v in cb_views(cb, model) if isinstance(v, ResponseView))
    payload = view.capture(model)
    np.testing.assert_allclose(payload["c"], samples * 2.0)
    kernel = model.get_layer("c").get_weights()[0]
    snap = type("S", (), {"arrays": {"c/kernel": kernel}})()
    ref = np.stack(
        [correlate2d(samples[0, :, :, 0] * 2.0, kernel[:, :, 0, o], mode="same") for o in range(2)],
        axis=-1,
    )
    np.testing.assert_allclose(view.responses(snap, payload)["c"][0], ref, rtol=1e-5, atol=1e-6)


def test_channels_first_kernel_responses(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((3, 8, 8)),
            keras.layers.Conv2D(2, 3, data_format="channels_first", name="c"),
        ]
    )
    samples = np.moveaxis(_images(1, channels=3, seed=8), -1, 1)  # (1, 3, 8, 8)
    cb = WeightWatch(tmp_path / "run", sample_images=samples)
    view = next(v for v in cb_views(cb, model) if isinstance(v, ResponseView))
    kernel = model.get_layer("c").get_weights()[0]
    snap = type("S", (), {"arrays": {"c/kernel": kernel}})()
    got = view.responses(snap, None)["c"]
    ref = _scipy_responses(np.moveaxis(samples, 1, -1), kernel.astype(np.float64))
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ models with several inputs


def _two_inputs(deeper=False):
    """An image input (8, 8, 3) through a Conv2D (after a Rescaling when `deeper`), and a
    tabular input (4,), joined."""
    img, tab = keras.Input((8, 8, 3), name="img"), keras.Input((4,), name="tab")
    h = keras.layers.Rescaling(2.0, name="scale")(img) if deeper else img
    h = keras.layers.Conv2D(2, 3, name="conv")(h)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(h), keras.layers.Dense(3)(tab)])
    return keras.Model([img, tab], keras.layers.Dense(1, name="out")(h))


def test_kernel_responses_work_for_a_model_with_two_inputs(tmp_path, recorder):
    model = _two_inputs()
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    samples = _images(2, channels=3, seed=9)
    run = str(tmp_path / "run")
    rng = np.random.default_rng(3)
    x = [rng.random((16, 8, 8, 3)).astype("float32"), rng.random((16, 4)).astype("float32")]
    model.fit(x, rng.random((16, 1)).astype("float32"), epochs=2, batch_size=8, verbose=0,
              callbacks=[WeightWatch(run, sample_images=samples), recorder])
    conv = [w.path for w in model.weights].index(model.get_layer("conv").kernel.path)
    acc = _acc(run)
    for step, weights in ((-1, recorder.initial), (1, recorder.epochs[1])):
        ref = _scipy_responses(samples, weights[conv].astype(np.float64))
        for i in range(2):
            img = _image(acc, _response_tag(model, "conv", i), step)
            expected = response_grid(samples[i], ref[i], geometry=VALID_3X3).image
            assert np.abs(img.astype(int) - expected).max() <= 1


def _prepare_error(model, **kwargs):
    with pytest.raises(ValueError) as e:
        cb_views(WeightWatch("unused-run", **kwargs), model)
    return str(e.value)


def test_a_two_input_model_checks_images_against_the_conv_layers_own_input():
    said = _prepare_error(_two_inputs(), sample_images=_images(1, channels=1))
    assert said == ("`sample_images` must match the input shape of 'conv' (model input 'img') "
                    "(None, 8, 8, 3). Received: sample_images with shape (1, 8, 8, 1)")


def test_activation_mode_says_it_needs_a_model_with_one_input():
    said = _prepare_error(_two_inputs(), sample_images=_images(1, channels=3),
                          response_mode="activation")
    assert said == (
        "`response_mode='activation'` computes the output of 'conv' by running the model on "
        "the sample images, which needs a model with exactly one input; this model has 2 "
        "(['img', 'tab']). `response_mode='kernel'` needs only the kernel, for a Conv2D layer "
        "fed directly by a model input. Received: response_mode='activation'")


def test_kernel_mode_of_a_deeper_layer_in_a_two_input_model_says_why_not():
    said = _prepare_error(_two_inputs(deeper=True), sample_images=_images(1, channels=3))
    assert said == (
        "`sample_images`: 'conv' is not fed directly by a model input, so its input is computed "
        "by running the model on the sample images, which needs a model with exactly one input; "
        "this model has 2 (['img', 'tab']). Name a Conv2D layer fed directly by an input in "
        "`response_layers`. Received: response_layers=None")


def test_a_url_responses_dir_is_written_through_fsspec_not_as_a_local_directory(
        tmp_path, monkeypatch):
    import fsspec

    monkeypatch.chdir(tmp_path)  # a local directory named "memory:" would appear here
    model = _cnn(filters=3)
    url = f"memory://{tmp_path.name}/pngs"
    cb = WeightWatch(str(tmp_path / "run"), sample_images=_images(2), responses_dir=url,
                     saliency=["vanilla"], kernel_images=False, histograms=False)
    _fit(model, cb, epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    acc = _acc(str(tmp_path / "run"))
    fs = fsspec.filesystem("memory")
    from view_helpers import _saliency_tag

    for step in (-1, 0):
        for i in range(2):
            events = {"conv": _values(acc, _response_tag(model, "conv", i)),
                      "saliency/vanilla": _values(acc, _saliency_tag(model, "vanilla", i))}
            for folder, by_step in events.items():
                got = fs.cat_file(f"{url}/{folder}/sample_{i}/step_{step}.png")
                assert got == by_step[step][2]
    names = fs.find(url)
    assert len(names) == 2 * 2 * 2 and all(n.endswith(".png") for n in names)
