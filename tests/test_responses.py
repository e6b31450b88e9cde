"""responses.correlate: equals scipy's 2-D correlation and Keras's own convolution."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import correlate2d

from keras_weightwatch.responses import correlate


def _scipy(images, kernel, mode):
    n, _, _, c = images.shape
    outs = []
    for i in range(n):
        per_kernel = [
            sum(correlate2d(images[i, :, :, ch], kernel[:, :, ch, o], mode=mode) for ch in range(c))
            for o in range(kernel.shape[3])
        ]
        outs.append(np.stack(per_kernel, axis=-1))
    return np.stack(outs)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("ksize", [(3, 3), (2, 4), (1, 1)])
def test_valid_equals_scipy_correlate2d(channels, ksize):
    rng = np.random.default_rng(0)
    x = rng.random((2, 9, 8, channels))
    k = rng.normal(size=ksize + (channels, 5))
    got = correlate(x, k)
    np.testing.assert_allclose(got, _scipy(x, k, "valid"), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ksize", [(3, 3), (5, 3)])
def test_same_with_odd_kernels_equals_scipy_same(ksize):
    rng = np.random.default_rng(1)
    x = rng.random((1, 7, 10, 2))
    k = rng.normal(size=ksize + (2, 3))
    np.testing.assert_allclose(correlate(x, k, padding="same"), _scipy(x, k, "same"), atol=1e-12)


@pytest.mark.parametrize(
    "strides, padding, dilation, ksize",
    [
        (1, "same", 1, (2, 2)),
        (2, "valid", 1, (3, 3)),
        (2, "same", 1, (3, 3)),
        ((1, 3), "same", 1, (4, 2)),
        (1, "valid", 2, (3, 3)),
        (1, "same", (2, 3), (3, 2)),
    ],
)
def test_equals_keras_conv(strides, padding, dilation, ksize):
    import keras

    rng = np.random.default_rng(2)
    x = rng.random((2, 11, 10, 3)).astype(np.float32)
    k = rng.normal(size=ksize + (3, 4)).astype(np.float32)
    ref = keras.ops.convert_to_numpy(
        keras.ops.conv(x, k, strides=strides, padding=padding, dilation_rate=dilation)
    )
    got = correlate(x, k, strides, padding, dilation)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_plus_bias_is_the_conv2d_layer_output():
    import keras

    layer = keras.layers.Conv2D(4, 3, strides=2, padding="same", bias_initializer="random_normal")
    x = np.random.default_rng(3).random((2, 9, 9, 1)).astype(np.float32)
    out = keras.ops.convert_to_numpy(layer(x))
    kernel, bias = (np.asarray(w) for w in layer.get_weights())
    np.testing.assert_allclose(correlate(x, kernel, 2, "same") + bias, out, atol=1e-5)


def test_kernel_larger_than_image_gives_an_empty_response():
    assert correlate(np.ones((1, 2, 2, 1)), np.ones((3, 3, 1, 2))).shape == (1, 0, 0, 2)


def test_errors():
    with pytest.raises(ValueError, match=r"Received: images.shape=\(2, 2, 1\)"):
        correlate(np.ones((2, 2, 1)), np.ones((1, 1, 1, 1)))
    with pytest.raises(ValueError, match=r"Received: kernel.shape=\(1, 1, 2, 1\)"):
        correlate(np.ones((1, 2, 2, 1)), np.ones((1, 1, 2, 1)))
    with pytest.raises(ValueError, match="Received: padding='causal'"):
        correlate(np.ones((1, 2, 2, 1)), np.ones((1, 1, 1, 1)), padding="causal")
