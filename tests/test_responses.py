"""responses.correlate: equals scipy's 2-D correlation and Keras's own convolution."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import correlate2d

from keras_weightwatch.responses import Geometry, at_input_size, correlate, source_index


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


# ------------------------------------------------------------ drawing responses at the input's size


def _keras_centres(n, k, s, d, padding):
    """Each output's receptive-field centre on a 1-D axis of `n` pixels, read from Keras's own
    convolution: a delta at input y reaches output o through the centre tap of an odd kernel
    exactly when o is centred on y."""
    import keras

    x = np.eye(n, dtype=np.float32).reshape(n, 1, n, 1)  # n images, one delta each
    tap = np.zeros((1, k, 1, 1), np.float32)
    tap[0, k // 2] = 1.0
    y = keras.ops.convert_to_numpy(
        keras.ops.conv(x, tap, strides=(1, s), padding=padding, dilation_rate=(1, d)))
    hits = y[:, 0, :, 0]  # (input y, output o)
    assert np.all(hits.sum(axis=0) == 1)  # every output has exactly one centre
    return hits.argmax(axis=0)


@pytest.mark.parametrize("n, k, s, d, padding", [
    (8, 3, 1, 1, "same"), (8, 3, 1, 1, "valid"), (64, 7, 2, 1, "same"), (63, 7, 2, 1, "same"),
    (11, 3, 2, 1, "valid"), (12, 3, 3, 1, "same"), (10, 5, 1, 2, "valid"), (9, 5, 1, 2, "same"),
])
def test_source_index_takes_the_output_centred_nearest_within_half_a_stride(n, k, s, d, padding):
    centres = _keras_centres(n, k, s, d, padding)
    got = source_index(n, k, s, d, padding)
    assert got.shape == (n,)
    for y in range(n):
        dist = np.abs(centres - y)
        if dist.min() > s / 2:
            assert got[y] == -1, y
        else:
            assert got[y] >= 0 and dist[got[y]] == dist.min(), y
    assert set(got[got >= 0]) == set(range(len(centres)))  # every output is drawn


def test_at_input_size_repeats_a_stride_2_map_and_masks_the_valid_border():
    m = np.random.default_rng(4).normal(size=(2, 4, 4, 3))
    out, covered = at_input_size(m, (8, 8), Geometry((3, 3), (2, 2), "same"))
    np.testing.assert_array_equal(out, np.repeat(np.repeat(m, 2, axis=1), 2, axis=2))
    assert covered.all()
    v = np.random.default_rng(5).normal(size=(6, 4, 1))  # 'valid' 3x3 on 8x6
    out, covered = at_input_size(v, (8, 6), Geometry((3, 3)))
    assert covered[1:-1, 1:-1].all() and covered.sum() == 6 * 4
    np.testing.assert_array_equal(out[1:-1, 1:-1], v)
    assert np.all(out[~covered] == 0)


def test_at_input_size_of_a_layer_after_pooling_stretches_its_input_to_the_image():
    m = np.random.default_rng(6).normal(size=(4, 4, 2))  # 3x3 'same' on a 4x4 pooled input
    out, covered = at_input_size(m, (8, 8), Geometry((3, 3), padding="same", input_size=(4, 4)))
    np.testing.assert_array_equal(out, np.repeat(np.repeat(m, 2, axis=0), 2, axis=1))
    assert covered.all()
    with pytest.raises(ValueError, match=r"Received: maps.shape=\(3, 3, 2\)"):
        at_input_size(m[:3, :3], (8, 8), Geometry((3, 3), padding="same", input_size=(4, 4)))
