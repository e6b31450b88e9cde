"""Views through the callback: a tiny CNN trained 2 epochs, read back with TensorBoard's reader."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from scipy.signal import correlate2d
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.util import tensor_util

from keras_weightwatch import WeightWatch, load_run
from keras_weightwatch.capture import describe_model
from keras_weightwatch.features import markdown_table, top_k_features
from keras_weightwatch.images import kernel_grid, response_grid
from keras_weightwatch.summaries import tag
from keras_weightwatch.views import ResponseView, build_views

STATS = ("l2_norm", "mean", "std", "max_abs", "nan_count", "inf_count", "update_ratio")


# ---------------------------------------------------------------- helpers


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


# ---------------------------------------------------------------- tags and statistics


def test_exact_tags_per_kind_for_a_tiny_cnn(tmp_path, recorder):
    keras.utils.set_random_seed(0)
    model = _cnn()
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run, sample_images=_images()), extra=[recorder])
    acc = _acc(run)
    weights = ["conv/kernel", "conv/bias", "out/kernel", "out/bias"]
    assert _tags_by_plugin(acc) == {
        "scalars": {f"{w}/{s}" for w in weights for s in STATS},
        "histograms": {f"{w}/histogram" for w in weights},
        "images": {"conv/kernel/image", "responses/conv/sample_0", "responses/conv/sample_1"},
    }
    # steps: the initial snapshot is -1; update_ratio starts at the first epoch
    assert sorted(_values(acc, "conv/kernel/l2_norm")) == [-1, 0, 1]
    assert sorted(_values(acc, "conv/kernel/update_ratio")) == [0, 1]
    assert sorted(_values(acc, "conv/kernel/image")) == [-1, 0, 1]
    assert sorted(_values(acc, "out/bias/histogram")) == [-1, 0, 1]
    # statistics equal a numpy computation on get_weights()
    snaps = {-1: recorder.initial, 0: recorder.epochs[0], 1: recorder.epochs[1]}
    for i, w in enumerate(weights):
        for step, arrays in snaps.items():
            a = arrays[i].astype(np.float64)
            got = {s: float(_values(acc, f"{w}/{s}").get(step, np.nan)) for s in STATS}
            assert got["l2_norm"] == pytest.approx(np.linalg.norm(a), rel=1e-6)
            assert got["mean"] == pytest.approx(a.mean(), rel=1e-5, abs=1e-7)
            assert got["std"] == pytest.approx(a.std(), rel=1e-4, abs=1e-6)
            assert got["max_abs"] == pytest.approx(np.abs(a).max(), rel=1e-6)
            assert got["nan_count"] == 0 and got["inf_count"] == 0
            if step >= 0:
                prev = snaps[step - 1][i].astype(np.float64)
                ratio = np.linalg.norm(a - prev) / np.linalg.norm(prev) if prev.any() else np.nan
                if np.isfinite(ratio):
                    assert got["update_ratio"] == pytest.approx(ratio, rel=1e-5)
            h = _values(acc, f"{w}/histogram")[step]
            assert h.shape == (30, 3) and h[:, 2].sum() == a.size
            assert h[0, 0] == pytest.approx(a.min()) or a.min() == a.max()
    # the statistics are in the snapshot manifest too
    rec = load_run(run).snapshot(1)
    assert rec.stats["conv/kernel"]["l2_norm"] == pytest.approx(
        float(_values(acc, "conv/kernel/l2_norm")[1]), rel=1e-6
    )


def test_switches_turn_views_off(tmp_path):
    model = _cnn()
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run, histograms=False, kernel_images=False), epochs=1)
    assert set(_tags_by_plugin(_acc(run))) == {"scalars"}


def test_fitting_twice_with_one_callback_appends_to_one_event_file(tmp_path):
    model = _cnn()
    run = str(tmp_path / "run")
    cb = WeightWatch(run)
    _fit(model, cb)
    files = os.listdir(os.path.join(run, "weights"))
    _fit(model, cb)
    assert os.listdir(os.path.join(run, "weights")) == files and len(files) == 1
    _fit(model, WeightWatch(run), epochs=1)  # another instance continuing the run
    assert os.listdir(os.path.join(run, "weights")) == files
    acc = _acc(run)
    assert sorted(_values(acc, "conv/kernel/l2_norm")) == [-1, 0, 1, 2, 3, 4]
    assert sorted(_values(acc, "conv/kernel/image")) == [-1, 0, 1, 2, 3, 4]
    assert load_run(run).steps == [-1, 0, 1, 2, 3, 4]


def test_nan_and_inf_are_counted_and_histograms_stay_non_empty(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="d")])
    model.build((None, 4))
    k, b = model.get_weights()
    k[0, 0] = np.nan
    k[1, 1] = np.nan
    k[2, 2] = np.inf
    k[3, 0] = -np.inf
    model.set_weights([k, b])
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run, feature_names=list("abcd")))
    acc = _acc(run)
    nan = _values(acc, "d/kernel/nan_count")
    inf = _values(acc, "d/kernel/inf_count")
    assert float(nan[-1]) == 2 and float(inf[-1]) == 2
    for step in (-1, 0, 1):
        h = _values(acc, "d/kernel/histogram")[step]
        assert h.shape == (30, 3) and np.all(np.isfinite(h))
        assert h[:, 2].sum() + float(nan[step]) + float(inf[step]) == 12
    assert _values(acc, "d/kernel/histogram")[-1][:, 2].sum() == 8
    # rows with Inf rank first, NaN last; the table shows them as such
    table = _values(acc, "features/d")[-1].item().decode()
    for line in (
        "| 1 | c | Inf |",
        "| 2 | d | Inf |",
        "| 3 | a | NaN |",
        "| 4 | b | NaN |",
        "| a | NaN | ",
    ):
        assert line in table


# ---------------------------------------------------------------- top-k features

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


def test_planted_dense_kernel_gives_exact_top_k_in_table_and_scalars(tmp_path):
    model = _boston_model()
    run = str(tmp_path / "run")
    x = np.random.default_rng(1).normal(size=(32, 13)).astype("float32")
    y = np.zeros((32, 1), "float32")
    _fit(model, WeightWatch(run, feature_names=BOSTON, top_k=5), x=x, y=y, lr=0.0)
    acc = _acc(run)
    tags = _tags_by_plugin(acc)
    assert tags["text"] == {"features/price"}
    assert {t for t in tags["scalars"] if t.startswith("features/")} == {
        f"features/price/{n}" for n in BOSTON
    }
    for step in (-1, 0, 1):
        for name, w in zip(BOSTON, PLANTED):
            assert float(_values(acc, f"features/price/{name}")[step]) == float(np.float32(w))
        table = _values(acc, "features/price")[step].item().decode().splitlines()
        assert table[2:] == [
            "| rank | feature | weight |",
            "|---:|:---|---:|",
            "| 1 | LSTAT | -3.81 |",
            "| 2 | DIS | -3.73 |",
            "| 3 | RM | 2.85 |",
            "| 4 | RAD | 2.29 |",
            "| 5 | NOX | -2.12 |",
        ]
    assert "initial weights, step -1" in _values(acc, "features/price")[-1].item().decode()


def test_feature_data_flags_correlated_features(tmp_path):
    model = _boston_model()
    rng = np.random.default_rng(3)
    data = rng.normal(size=(200, 13))
    data[:, 7] = -data[:, 12] * 2 + 0.01 * rng.normal(size=200)  # DIS ~ -LSTAT
    run = str(tmp_path / "run")
    cb = WeightWatch(run, feature_names=BOSTON, top_k=3, feature_data=data)
    _fit(model, cb, epochs=1, x=data.astype("float32"), y=np.zeros((200, 1), "float32"), lr=0.0)
    table = _values(_acc(run), "features/price")[0].item().decode()
    expected = markdown_table(
        top_k_features(np.array(PLANTED, "float32")[:, None], BOSTON, 3, data), 1
    )
    assert table.endswith(expected)
    assert "| 1 | LSTAT | -3.81 | " in table and "**DIS** (-1)" in table


def test_features_of_a_named_layer_with_several_units(tmp_path):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="a"), keras.layers.Dense(2, name="b")]
    )
    model.build((None, 3))
    model.get_layer("b").set_weights(
        [np.array([[3.0, 4.0], [0.0, 1.0]], "float32"), np.zeros(2, "float32")]
    )
    run = str(tmp_path / "run")
    cb = WeightWatch(run, feature_layer="b", feature_names=["h0", "h1"], top_k=2)
    _fit(model, cb, epochs=1, lr=0.0, x=np.ones((8, 3), "float32"))
    acc = _acc(run)
    assert float(_values(acc, "features/b/h0")[0]) == 5.0
    table = _values(acc, "features/b")[0].item().decode()
    assert "| 1 | h0 | 5 |" in table and "| h0 | 3 | 4 |" in table
    # the header records which kernel the table read, so `diff` compares the same one
    from keras_weightwatch import load_run

    assert load_run(run).settings["feature_key"] == "b/kernel"


def test_a_wide_feature_layer_gets_scalars_only_for_its_top_k_features(tmp_path):
    from keras_weightwatch.views import MAX_FEATURE_SCALARS

    n = MAX_FEATURE_SCALARS + 20
    model = keras.Sequential([keras.Input((n,)), keras.layers.Dense(3, name="wide")])
    model.build((None, n))
    kernel = np.random.default_rng(0).normal(size=(n, 3)).astype("float32") * 0.01
    top = [7, 101, 3, 60]
    for rank, i in enumerate(top):
        kernel[i] = 5.0 - rank
    model.get_layer("wide").set_weights([kernel, np.zeros(3, "float32")])
    run = str(tmp_path / "run")
    names = [f"f{i}" for i in range(n)]
    _fit(model, WeightWatch(run, feature_names=names, top_k=4), lr=0.0, x=np.ones((8, n), "f4"))
    acc = _acc(run)
    tags = {t for t in _tags_by_plugin(acc)["scalars"] if t.startswith("features/")}
    assert tags == {f"features/wide/f{i}" for i in top}
    for i in top:
        norm = float(np.sqrt(np.sum(kernel[i].astype(np.float64) ** 2)))
        values = _values(acc, f"features/wide/f{i}")
        assert sorted(values) == [-1, 0, 1]
        assert all(float(v) == float(np.float32(norm)) for v in values.values())


# ---------------------------------------------------------------- kernel images


def test_3x3x1x5_kernel_image_has_5_tiles_of_the_kernel(tmp_path, recorder):
    model = _cnn(filters=5)
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run), extra=[recorder])
    acc = _acc(run)
    for step, weights in ((-1, recorder.initial), (1, recorder.epochs[1])):
        kernel = weights[0]
        assert kernel.shape == (3, 3, 1, 5)
        grid = kernel_grid(kernel)
        assert len(grid.tiles) == 5
        img = _image(acc, "conv/kernel/image", step)
        np.testing.assert_array_equal(img, grid.image)
        # the pixels map back to values: the tile of the largest weight is at full colour
        o = int(np.argmax(np.abs(kernel).reshape(-1, 5).max(0)))
        i, j = np.unravel_index(np.argmax(np.abs(kernel[..., 0, o])), (3, 3))
        y, x = grid.origins[o]
        px = img[y + i * grid.scale, x + j * grid.scale]
        assert tuple(px) in {(33, 102, 172), (178, 24, 43)}
    desc = acc.SummaryMetadata("conv/kernel/image").summary_description
    assert "5 of 5 tiles" in desc


def test_7x7x3x64_kernel_is_one_rgb_grid_of_64_tiles(tmp_path, recorder):
    model = _cnn(filters=64, channels=3, size=9, ksize=7)
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run), epochs=1, extra=[recorder])
    acc = _acc(run)
    assert _tags_by_plugin(acc)["images"] == {"conv/kernel/image"}
    grid = kernel_grid(recorder.epochs[0][0])
    assert grid.rgb and len(grid.tiles) == 64
    img = _image(acc, "conv/kernel/image", 0)
    np.testing.assert_array_equal(img, grid.image)
    assert "64 of 64 tiles (RGB" in acc.SummaryMetadata("conv/kernel/image").summary_description


def test_every_conv_kind_gets_a_grid_and_the_tile_cap_applies(tmp_path):
    inp = keras.Input((10, 10, 2))
    h = keras.layers.Conv2D(4, 3, name="c2")(inp)
    h = keras.layers.DepthwiseConv2D(3, name="dw")(h)
    h = keras.layers.SeparableConv2D(3, 3, name="sep")(h)
    h = keras.layers.Conv2DTranspose(3, 3, name="tr")(h)
    h = keras.layers.Reshape((6 * 6, 3))(h)
    h = keras.layers.Conv1D(2, 3, name="c1")(h)
    out = keras.layers.Dense(1)(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    run = str(tmp_path / "run")
    x = np.random.default_rng(0).random((8, 10, 10, 2)).astype("float32")
    _fit(model, WeightWatch(run, max_kernel_tiles=6), epochs=1, x=x)
    acc = _acc(run)
    assert _tags_by_plugin(acc)["images"] == {
        "c2/kernel/image",
        "dw/kernel/image",
        "sep/depthwise_kernel/image",
        "tr/kernel/image",
        "c1/kernel/image",
    }
    weights = load_run(run).weights(0)
    for key in ("c2/kernel", "dw/kernel", "sep/depthwise_kernel"):
        np.testing.assert_array_equal(
            _image(acc, f"{key}/image", 0), kernel_grid(weights[key], 6, rgb=False).image
        )
    # 3 input channels (transposed conv: 3 output channels): RGB tiles
    assert weights["tr/kernel"].shape == (3, 3, 3, 3) and weights["c1/kernel"].shape == (3, 3, 2)
    for key in ("tr/kernel", "c1/kernel"):
        grid = kernel_grid(weights[key], 6)
        assert grid.rgb
        np.testing.assert_array_equal(_image(acc, f"{key}/image", 0), grid.image)
    assert "6 of 8 tiles" in acc.SummaryMetadata("c2/kernel/image").summary_description


# ---------------------------------------------------------------- responses


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
            img = _image(acc, f"responses/conv/sample_{i}", step)
            expected = response_grid(samples[i], ref[i]).image
            assert np.abs(img.astype(int) - expected).max() <= 1
            with open(pngs / "conv" / f"sample_{i}" / f"step_{step}.png", "rb") as f:
                assert f.read() == _values(acc, f"responses/conv/sample_{i}")[step][2]


def cb_views(cb, model):
    views = build_views(cb._view_settings())
    for v in views:
        v.prepare(model, describe_model(model))
    return views


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
        img = _image(acc, f"responses/conv/sample_{i}", 1)
        assert np.abs(img.astype(int) - response_grid(samples[i], ref[i]).image).max() <= 1


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


# ---------------------------------------------------------------- errors at train begin


class _EpochCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs += 1


@pytest.mark.parametrize(
    "build, kwargs, error, match",
    [
        (
            lambda: _boston_model(),
            {"feature_names": BOSTON[:5]},
            ValueError,
            r"`feature_names` has 5 names but layer 'price' has 13 input features\. Received: ",
        ),
        (
            lambda: _boston_model(),
            {"feature_layer": "nope"},
            ValueError,
            r"no layer named 'nope'.*Received: feature_layer='nope'",
        ),
        (
            lambda: _boston_model(),
            {"feature_layer": "norm"},
            ValueError,
            r"must name a Dense layer; 'norm' is a Normalization\. Received: feature_layer='norm'",
        ),
        (
            lambda: _cnn(),
            {"feature_names": ["a"]},
            ValueError,
            r"needs a Dense layer fed by the model input.*Received: feature_layer=None",
        ),
        (
            lambda: _boston_model(),
            {"feature_names": BOSTON, "feature_data": np.ones((5, 3))},
            ValueError,
            r"must have shape \(samples, 13\).*Received: feature_data with shape \(5, 3\)",
        ),
        (
            lambda: _boston_model(),
            {"feature_data": np.array([["a"] * 13] * 3)},
            TypeError,
            r"`feature_data` must be numeric",
        ),
        (
            lambda: _cnn(),
            {"sample_images": np.ones((8, 8, 1))},
            ValueError,
            r"4-D batch.*Received: sample_images with shape \(8, 8, 1\)",
        ),
        (
            lambda: _cnn(),
            {"sample_images": np.ones((2, 8, 8, 3))},
            ValueError,
            r"match the model input shape \(None, 8, 8, 1\).*shape \(2, 8, 8, 3\)",
        ),
        (
            lambda: _cnn(),
            {"sample_images": np.array([[[["x"]] * 8] * 8])},
            TypeError,
            r"`sample_images` must be numeric images",
        ),
        (
            lambda: _cnn(),
            {"sample_images": np.ones((1, 8, 8, 1)), "response_layers": ["out"]},
            ValueError,
            r"must name Conv2D layers.*'out' is a Dense\. Received: response_layers=",
        ),
        (
            lambda: _cnn(),
            {"sample_images": np.ones((1, 8, 8, 1)), "response_layers": ["x"]},
            ValueError,
            r"no layer named 'x'",
        ),
        (
            lambda: _boston_model(),
            {"sample_images": np.ones((1, 13, 1, 1))},
            ValueError,
            r"match the model input shape \(None, 13\)",
        ),
        (
            lambda: _cnn(),
            {"response_layers": ["conv"]},
            ValueError,
            r"need `sample_images`\. Received: sample_images=None",
        ),
    ],
)
def test_model_dependent_errors_raise_before_any_epoch(tmp_path, build, kwargs, error, match):
    model = build()
    counter = _EpochCounter()
    run = tmp_path / "run"
    with pytest.raises(error, match=match):
        _fit(
            model,
            WeightWatch(run, **kwargs),
            epochs=1,
            extra=[counter],
            x=np.zeros((4,) + model.input_shape[1:], "float32"),
        )
    assert counter.epochs == 0
    assert not os.path.exists(run)


def test_tags_do_not_collide_for_feature_names_that_clean_to_the_same_tag(tmp_path):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="d")])
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run, feature_names=["a b", "a_b"]), epochs=1)
    assert {t for t in _acc(run).Tags()["tensors"] if t.startswith("features/")} == {
        "features/d",
        tag("features", "d", "a b"),
        "features/d/a_b_1",
    }
