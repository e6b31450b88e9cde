"""saliency: Grad-CAM against a plain-numpy forward/backward pass, vanilla against finite
differences, SmoothGrad against its definition, drawing against the colour code of images."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import fd_input_unit

from keras_weightwatch import images, saliency

F64 = "float64"


def planted_cnn(channels=1):
    """Conv2D(3, 3x3, relu, valid) -> Flatten -> Dense(2) on 6x6 images, planted weights."""
    model = keras.Sequential(
        [
            keras.Input((6, 6, channels), dtype=F64),
            keras.layers.Conv2D(3, 3, activation="relu", name="conv", dtype=F64),
            keras.layers.Flatten(dtype=F64),
            keras.layers.Dense(2, name="logits", dtype=F64),
        ]
    )
    rng = np.random.default_rng(7)
    kernel = rng.normal(size=(3, 3, channels, 3))
    kernel[:, 0, :, 0], kernel[:, 2, :, 0] = 1.0, -1.0  # a vertical-edge filter
    model.set_weights([kernel, np.array([0.1, -0.2, 0.0]), rng.normal(size=(48, 2)),
                       np.array([0.0, 0.5])])
    return model


def images_batch(n=2, channels=1, seed=8):
    return np.random.default_rng(seed).normal(size=(n, 6, 6, channels))


def numpy_gradcam(model, x, classes):
    """Forward and backward pass of planted_cnn written out in numpy."""
    kernel, bias, dense, _ = model.get_weights()
    n = len(x)
    pre = np.zeros((n, 4, 4, 3))
    for i in range(4):
        for j in range(4):
            pre[:, i, j, :] = np.einsum("nhwc,hwck->nk", x[:, i : i + 3, j : j + 3, :], kernel)
    acts = np.maximum(pre + bias, 0.0)
    # score = flatten(acts) @ dense[:, c]: its gradient with respect to acts is the column.
    grads = np.stack([dense[:, c].reshape(4, 4, 3) for c in classes])
    weights = grads.mean(axis=(1, 2))  # (n, K)
    return np.maximum(np.einsum("nhwk,nk->nhw", acts, weights), 0.0)


def test_gradcam_equals_a_numpy_gradcam_of_planted_weights():
    model = planted_cnn()
    x = images_batch(3)
    got = saliency.gradcam(model, x, layer="conv", class_index=[0, 1, 1])
    ref = numpy_gradcam(model, x, [0, 1, 1])
    assert got.maps.shape == (3, 6, 6) and got.layer == "conv"
    np.testing.assert_array_equal(got.classes, [0, 1, 1])
    np.testing.assert_allclose(got.maps, saliency.resize_bilinear(ref, (6, 6)), rtol=1e-10,
                               atol=1e-12)
    default = saliency.gradcam(model, x)  # the last conv layer, each image's predicted class
    predicted = np.argmax(np.asarray(model(x, training=False)), axis=-1)
    np.testing.assert_array_equal(default.classes, predicted)
    np.testing.assert_allclose(default.maps, saliency.resize_bilinear(
        numpy_gradcam(model, x, predicted), (6, 6)), rtol=1e-10, atol=1e-12)


def test_resize_bilinear_matches_tf_image_resize():
    import tensorflow as tf

    maps = np.random.default_rng(9).random((2, 4, 5))
    for size in ((6, 6), (28, 28), (9, 13)):
        ref = tf.image.resize(maps[..., None], size, method="bilinear").numpy()[..., 0]
        np.testing.assert_allclose(saliency.resize_bilinear(maps, size), ref, atol=1e-6)


def test_vanilla_is_the_channel_max_of_finite_difference_gradients():
    model = planted_cnn(channels=3)
    x = images_batch(2, channels=3)
    got = saliency.vanilla(model, x)
    fd = fd_input_unit(model, x, got.classes)
    np.testing.assert_allclose(got.maps, np.abs(fd).max(axis=-1), rtol=1e-6, atol=1e-8)
    chosen = saliency.vanilla(model, x, class_index=1)
    np.testing.assert_array_equal(chosen.classes, [1, 1])
    np.testing.assert_allclose(chosen.maps, np.abs(fd_input_unit(model, x, [1, 1])).max(-1),
                               rtol=1e-6, atol=1e-8)


def test_smoothgrad_is_the_mean_vanilla_map_of_seeded_noisy_copies():
    model = planted_cnn()
    x = images_batch(2)
    got = saliency.smoothgrad(model, x, samples=4, noise=0.2, seed=3)
    rng = np.random.default_rng(3)
    copies = np.repeat(x, 4, axis=0)
    span = np.repeat(x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)), 4).reshape(-1, 1, 1, 1)
    noisy = copies + rng.normal(size=copies.shape) * span * 0.2
    classes = np.argmax(np.asarray(model(x, training=False)), axis=-1)  # the clean images'
    np.testing.assert_array_equal(got.classes, classes)
    ref = [saliency.vanilla(model, noisy[i : i + 1], classes[i // 4]).maps[0] for i in range(8)]
    np.testing.assert_allclose(got.maps, np.stack(ref).reshape(2, 4, 6, 6).mean(axis=1),
                               rtol=1e-10)
    np.testing.assert_array_equal(got.maps, saliency.smoothgrad(model, x, samples=4, noise=0.2,
                                                                seed=3).maps)
    assert not np.allclose(got.maps, saliency.smoothgrad(model, x, samples=4, seed=4).maps)
    clean = saliency.smoothgrad(model, x, samples=2, noise=0.0)
    np.testing.assert_allclose(clean.maps, saliency.vanilla(model, x).maps, rtol=1e-12)


def test_gradcam_needs_a_conv_layer_and_images():
    dense = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="needs a convolution layer.*Received: model="):
        saliency.gradcam(dense, images_batch().astype("float32"))
    with pytest.raises(ValueError, match=r"Received: images.shape=\(6, 6\)"):
        saliency.vanilla(dense, np.zeros((6, 6)))


def test_overlay_keeps_the_image_where_there_is_no_heat_and_reddens_the_hottest_pixel():
    image = np.random.default_rng(10).random((5, 7, 1))
    heat = np.zeros((5, 7))
    heat[2, 3] = 4.0
    heat[0, 0] = 2.0
    out = saliency.overlay(image, heat, alpha=0.5)
    base = images.intensity_rgb(image[..., 0]).astype(float)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    cold = heat == 0
    np.testing.assert_array_equal(out[cold], base[cold].astype(np.uint8))
    red = images.diverging_rgb(np.array(4.0), 4.0).astype(float)
    np.testing.assert_array_equal(out[2, 3], np.rint(0.5 * base[2, 3] + 0.5 * red))
    half = images.diverging_rgb(np.array(2.0), 4.0).astype(float)
    np.testing.assert_array_equal(out[0, 0], np.rint(0.75 * base[0, 0] + 0.25 * half))
    heat[1, 1] = np.nan
    assert tuple(saliency.overlay(image, heat)[1, 1]) == images.NONFINITE_RGB


def test_panel_shows_image_heat_and_overlay_and_encodes_as_png():
    image = np.random.default_rng(11).random((4, 4, 3))
    heat = np.arange(16.0).reshape(4, 4)
    out = saliency.panel(image, heat)
    tiles = [images.intensity_rgb(image), images.diverging_rgb(heat, 15.0),
             saliency.overlay(image, heat)]
    ref, _, _ = images.compose(tiles, cols=3)
    np.testing.assert_array_equal(out, ref)
    assert images.encode_png(out).startswith(b"\x89PNG")
