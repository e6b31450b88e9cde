"""images: grids map back to kernel values; colours; RGB tiles; PNG decoded by TensorFlow."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from keras_weightwatch.images import (
    NONFINITE_RGB,
    SEPARATOR_RGB,
    compose,
    diverging_rgb,
    encode_png,
    kernel_grid,
    response_grid,
    upscale,
)


def _decode_png(data: bytes) -> np.ndarray:
    import tensorflow as tf

    return tf.io.decode_png(data).numpy()


# A lookup table to invert the diverging colour map: colour -> value in [-1, 1].
_T = np.linspace(-1, 1, 4001)
_LUT = diverging_rgb(_T, 1.0).astype(np.int32)


def _invert(rgb: np.ndarray) -> np.ndarray:
    d = np.abs(rgb.reshape(-1, 1, 3).astype(np.int32) - _LUT[None]).sum(-1)
    return _T[np.argmin(d, axis=1)].reshape(rgb.shape[:-1])


def _tile_pixels(grid, i, shape):
    y, x = grid.origins[i]
    s = grid.scale
    block = grid.image[y : y + shape[0] * s, x : x + shape[1] * s]
    # every scale x scale block is one weight (nearest neighbour)
    small = block[::s, ::s]
    assert np.array_equal(upscale(small, s), block)
    return small


def test_3x3x1x5_kernel_gives_5_tiles_that_map_back_to_the_values():
    k = np.random.default_rng(0).normal(size=(3, 3, 1, 5)).astype(np.float32)
    k[1, 1, 0, 2] = 0.0
    g = kernel_grid(k)
    assert g.tiles == tuple((0, o) for o in range(5)) and g.total == 5 and not g.rgb
    assert g.vmax == pytest.approx(np.abs(k).max())
    assert len({y for y, _ in g.origins}) == 1  # one row of 5
    for i, (_, o) in enumerate(g.tiles):
        px = _tile_pixels(g, i, (3, 3))
        np.testing.assert_allclose(_invert(px) * g.vmax, k[:, :, 0, o], atol=0.02 * g.vmax)
    assert tuple(_tile_pixels(g, 2, (3, 3))[1, 1]) == (247, 247, 247)  # zero is neutral
    # separators between and around the tiles
    assert tuple(g.image[0, 0]) == SEPARATOR_RGB
    y, x = g.origins[1]
    assert tuple(g.image[y, x - 1]) == SEPARATOR_RGB
    # the PNG decodes (with TensorFlow) to the same pixels
    np.testing.assert_array_equal(_decode_png(encode_png(g.image)), g.image)


def test_7x7x3x64_kernel_gives_one_rgb_grid_of_64_tiles():
    k = np.random.default_rng(1).normal(size=(7, 7, 3, 64)).astype(np.float32)
    g = kernel_grid(k)
    assert g.rgb and len(g.tiles) == 64 and g.total == 64
    assert len({y for y, _ in g.origins}) == 8 and len({x for _, x in g.origins}) == 8
    vmax = np.abs(k).max()
    for i, (inp, o) in enumerate(g.tiles):
        assert inp is None and o == i
        px = _tile_pixels(g, i, (7, 7)).astype(np.float64)
        np.testing.assert_allclose((px - 128) / 127 * vmax, k[..., o], atol=vmax / 127)


def test_rgb_can_be_turned_off_and_required_channels_checked():
    k = np.ones((3, 3, 3, 2))
    assert len(kernel_grid(k, rgb=False).tiles) == 6
    with pytest.raises(ValueError, match=r"Received: kernel.shape=\(3, 3, 2, 2\)"):
        kernel_grid(np.ones((3, 3, 2, 2)), rgb=True)


def test_negative_and_positive_are_distinguishable_and_symmetric():
    c = diverging_rgb(np.array([-1.0, -0.5, 0.0, 0.5, 1.0]), 1.0).astype(int)
    assert c[0, 2] > c[0, 0] and c[4, 0] > c[4, 2]  # blue for negative, red for positive
    assert tuple(c[2]) == (247, 247, 247)
    # distance from neutral grows symmetrically with |w|
    dist = np.abs(c - c[2]).sum(1)
    assert dist[0] > dist[1] > 0 and dist[4] > dist[3] > 0


def test_non_finite_weights_get_the_marked_colour_and_do_not_set_the_scale():
    k = np.zeros((3, 3, 1, 2), np.float32)
    k[0, 0, 0, 0] = np.nan
    k[2, 2, 0, 1] = -np.inf
    k[1, 1, 0, 1] = 0.5
    g = kernel_grid(k)
    assert g.vmax == 0.5
    assert tuple(_tile_pixels(g, 0, (3, 3))[0, 0]) == NONFINITE_RGB
    assert tuple(_tile_pixels(g, 1, (3, 3))[2, 2]) == NONFINITE_RGB
    assert tuple(_tile_pixels(g, 1, (3, 3))[1, 1]) == tuple(diverging_rgb(np.array(1.0), 1.0))


def test_all_zero_kernel_is_neutral():
    g = kernel_grid(np.zeros((2, 2, 1, 1)))
    assert g.vmax == 0.0 and tuple(_tile_pixels(g, 0, (2, 2))[0, 0]) == (247, 247, 247)


def test_tile_cap_and_layout_by_input():
    g = kernel_grid(np.ones((3, 3, 32, 64)), max_tiles=256)
    assert len(g.tiles) == 256 and g.total == 2048 and g.truncated
    assert g.tiles[:2] == ((0, 0), (0, 1)) and g.tiles[-1] == (3, 63)
    g2 = kernel_grid(np.ones((3, 3, 4, 5)))
    assert len({x for _, x in g2.origins}) == 5 and len({y for y, _ in g2.origins}) == 4
    assert g2.tiles[5] == (1, 0)  # second row is input channel 1


def test_1d_and_3d_kernels():
    k1 = np.arange(5 * 2 * 3, dtype=float).reshape(5, 2, 3) - 15
    g1 = kernel_grid(k1)
    assert len(g1.tiles) == 6
    np.testing.assert_allclose(
        _invert(_tile_pixels(g1, 4, (1, 5)))[0] * g1.vmax, k1[:, 1, 1], atol=0.02 * g1.vmax
    )
    k3 = np.random.default_rng(2).normal(size=(2, 3, 3, 1, 2))
    g3 = kernel_grid(k3)
    px = _tile_pixels(g3, 1, (3, 6))
    # depth slices side by side: columns 0-2 are depth 0, 3-5 depth 1
    np.testing.assert_allclose(_invert(px[:, 3:]) * g3.vmax, k3[1, :, :, 0, 1], atol=0.02 * g3.vmax)


def test_upscale_is_nearest_neighbour():
    a = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(upscale(a, 3), np.kron(a, np.ones((3, 3), np.uint8)))


def test_image_size_is_capped():
    g = kernel_grid(np.ones((3, 3, 16, 16)))
    assert max(g.image.shape[:2]) <= 2048 and g.scale == 8


def test_response_grid():
    img = np.random.default_rng(0).random((6, 6, 1))
    res = np.random.default_rng(1).normal(size=(4, 4, 3))
    g = response_grid(img, res)
    assert g.tiles == ("image", ("response", 0), ("response", 1), ("response", 2))
    assert g.vmax == pytest.approx(np.abs(res).max())
    grey = _tile_pixels(g, 0, (6, 6))
    assert np.all(grey[..., 0] == grey[..., 1])
    lo, hi = img.min(), img.max()
    np.testing.assert_array_equal(grey[..., 0], np.rint((img[..., 0] - lo) / (hi - lo) * 255))
    for o in range(3):
        px = _tile_pixels(g, o + 1, (4, 4))
        np.testing.assert_allclose(_invert(px) * g.vmax, res[..., o], atol=0.02 * g.vmax)
        y, x = g.origins[o + 1]  # smaller tiles sit on the separator colour
        assert tuple(g.image[y + 4 * g.scale, x]) == SEPARATOR_RGB


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3), (1, 1, 3)])
def test_png_roundtrip_with_an_independent_decoder(shape):
    a = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    png = encode_png(a)
    # chunk CRCs are valid
    ihdr_len = int.from_bytes(png[8:12], "big")
    assert int.from_bytes(png[16 + ihdr_len : 20 + ihdr_len], "big") == zlib.crc32(
        png[12 : 16 + ihdr_len]
    )
    got = _decode_png(png)
    np.testing.assert_array_equal(got.reshape(a.shape), a)


def test_png_errors():
    with pytest.raises(TypeError, match="Received: dtype=float64"):
        encode_png(np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"Received: shape=\(2, 2, 4\)"):
        encode_png(np.zeros((2, 2, 4), np.uint8))


def test_diff_grids_draw_a_b_reordered_by_the_matching_and_the_difference():
    from keras_weightwatch.images import diff_grids

    rng = np.random.default_rng(21)
    a = rng.normal(size=(3, 3, 2, 4))
    perm = np.array([2, 0, 3, 1])
    b = np.empty_like(a)
    b[..., perm] = a + 0.5  # B's unit perm[i] is A's unit i, shifted
    plain = diff_grids(a, b)
    assert np.array_equal(plain.a.image, kernel_grid(a).image)
    assert np.array_equal(plain.b.image, kernel_grid(b).image)
    assert np.array_equal(plain.b_minus_a.image, kernel_grid(b - a).image)
    matched = diff_grids(a, b, perm=perm)
    assert np.array_equal(matched.b.image, kernel_grid(b[..., perm]).image)
    assert np.array_equal(matched.b_minus_a.image, kernel_grid(np.full_like(a, 0.5)).image)


@pytest.mark.parametrize("scale, sep", [(None, None), (1, 1), (3, 2), (2, 0)])
@pytest.mark.parametrize("shapes", [[(3, 3)] * 7, [(3, 4), (5, 2), (1, 1), (5, 4)], [(2, 2)]])
def test_compose_places_each_upscaled_tile_on_its_cell(shapes, scale, sep):
    # Reference: a canvas of the separator colour, each tile enlarged with np.kron and
    # pasted at the top-left corner of its cell, one at a time.
    rng = np.random.default_rng(len(shapes))
    tiles = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    cols = 3
    image, origins, used = compose(tiles, cols, scale=scale, sep=sep)
    gap = sep if sep is not None else (2 if used > 1 else 1)
    cell_h = max(h for h, _ in shapes) * used + gap
    cell_w = max(w for _, w in shapes) * used + gap
    n_cols = min(cols, len(tiles))
    rows = -(-len(tiles) // n_cols)
    expected = np.empty((rows * cell_h + gap, n_cols * cell_w + gap, 3), np.uint8)
    expected[:] = SEPARATOR_RGB
    for i, tile in enumerate(tiles):
        y, x = gap + (i // n_cols) * cell_h, gap + (i % n_cols) * cell_w
        assert origins[i] == (y, x)
        big = np.kron(tile, np.ones((used, used, 1), np.uint8))
        expected[y : y + big.shape[0], x : x + big.shape[1]] = big
    np.testing.assert_array_equal(image, expected)
