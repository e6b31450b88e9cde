"""views.kernels: kernel image grids of every convolution kind."""

from __future__ import annotations

import keras
import numpy as np
from view_helpers import (
    _acc,
    _cnn,
    _fit,
    _image,
    _kernel_tags,
    _tags_by_plugin,
)

from keras_weightwatch import WeightWatch, load_run
from keras_weightwatch.images import kernel_grid


def test_3x3x1x5_kernel_image_has_5_tiles_of_the_kernel(tmp_path, recorder):
    model = _cnn(filters=5)
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run), extra=[recorder])
    acc = _acc(run)
    name = _kernel_tags(model, ["conv/kernel"])["conv/kernel"]
    assert name == "sequential/2_kernels/0_conv/kernel/image"  # an unnamed Sequential
    for step, weights in ((-1, recorder.initial), (1, recorder.epochs[1])):
        kernel = weights[0]
        assert kernel.shape == (3, 3, 1, 5)
        grid = kernel_grid(kernel)
        assert len(grid.tiles) == 5
        img = _image(acc, name, step)
        np.testing.assert_array_equal(img, grid.image)
        # the pixels map back to values: the tile of the largest weight is at full colour
        o = int(np.argmax(np.abs(kernel).reshape(-1, 5).max(0)))
        i, j = np.unravel_index(np.argmax(np.abs(kernel[..., 0, o])), (3, 3))
        y, x = grid.origins[o]
        px = img[y + i * grid.scale, x + j * grid.scale]
        assert tuple(px) in {(33, 102, 172), (178, 24, 43)}
    desc = acc.SummaryMetadata(name).summary_description
    assert "5 of 5 tiles" in desc


def test_7x7x3x64_kernel_is_one_rgb_grid_of_64_tiles(tmp_path, recorder):
    model = _cnn(filters=64, channels=3, size=9, ksize=7)
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run), epochs=1, extra=[recorder])
    acc = _acc(run)
    name = _kernel_tags(model, ["conv/kernel"])["conv/kernel"]
    assert _tags_by_plugin(acc)["images"] == {name}
    grid = kernel_grid(recorder.epochs[0][0])
    assert grid.rgb and len(grid.tiles) == 64
    img = _image(acc, name, 0)
    np.testing.assert_array_equal(img, grid.image)
    assert "64 of 64 tiles (RGB" in acc.SummaryMetadata(name).summary_description


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
    # numbered in model order, so that TensorBoard (sorting by tag) shows them as the layers come
    tags = _kernel_tags(model, ["c2/kernel", "dw/kernel", "sep/depthwise_kernel", "tr/kernel",
                                "c1/kernel"])
    assert _tags_by_plugin(acc)["images"] == set(tags.values())
    assert sorted(tags, key=tags.__getitem__) == list(tags)
    assert tags["c1/kernel"] == "functional/2_kernels/4_c1/kernel/image"
    weights = load_run(run).weights(0)
    for key in ("c2/kernel", "dw/kernel", "sep/depthwise_kernel"):
        np.testing.assert_array_equal(
            _image(acc, tags[key], 0), kernel_grid(weights[key], 6, rgb=False).image
        )
    # 3 input channels (transposed conv: 3 output channels): RGB tiles
    assert weights["tr/kernel"].shape == (3, 3, 3, 3) and weights["c1/kernel"].shape == (3, 3, 2)
    for key in ("tr/kernel", "c1/kernel"):
        grid = kernel_grid(weights[key], 6)
        assert grid.rgb
        np.testing.assert_array_equal(_image(acc, tags[key], 0), grid.image)
    assert "6 of 8 tiles" in acc.SummaryMetadata(tags["c2/kernel"]).summary_description


def test_a_kernel_keeps_its_number_when_include_exclude_leave_others_out(tmp_path):
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(2, 3, name="a"),
        keras.layers.Conv2D(2, 3, name="b"),
        keras.layers.Flatten(),
        keras.layers.Dense(1),
    ], name="two_convs")
    run = str(tmp_path / "run")
    _fit(model, WeightWatch(run, exclude=["a"]), epochs=1)
    # the same tag as in a run that watches both, so the two runs' grids overlay
    assert _tags_by_plugin(_acc(run))["images"] == {"two_convs/2_kernels/1_b/kernel/image"}
