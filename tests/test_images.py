"""images: grids map back to kernel values; colours; RGB tiles; PNG decoded by TensorFlow."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from scipy.signal import correlate2d

from keras_weightwatch.images import (
    NONFINITE_RGB,
    SEPARATOR_RGB,
    UNCOVERED_RGB,
    compose,
    diverging_rgb,
    encode_png,
    kernel_grid,
    response_grid,
    upscale,
)
from keras_weightwatch.responses import Geometry, correlate


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


def _per_tile(ref):
    """The reference drawing of one map: minus its mean, over its largest |deviation|."""
    dev = ref - ref.mean()
    return dev / np.abs(dev).max()


def test_response_grid_draws_each_tile_around_its_own_mean_on_its_own_scale():
    img = np.random.default_rng(0).random((6, 6, 1))
    res = np.random.default_rng(1).normal(size=(6, 6, 3))
    res[..., 2] = res[..., 2] * 100 + 50  # a strong map with a large mean: no shared scale
    g = response_grid(img, res)
    assert g.tiles == ("image", ("response", 0), ("response", 1), ("response", 2))
    assert g.vmax == 1.0
    np.testing.assert_allclose(g.means, res.mean(axis=(0, 1)))
    np.testing.assert_allclose(g.scales, np.abs(res - res.mean(axis=(0, 1))).max(axis=(0, 1)))
    grey = _tile_pixels(g, 0, (6, 6))
    assert np.all(grey[..., 0] == grey[..., 1])
    lo, hi = img.min(), img.max()
    np.testing.assert_array_equal(grey[..., 0], np.rint((img[..., 0] - lo) / (hi - lo) * 255))
    for o in range(3):
        px = _tile_pixels(g, o + 1, (6, 6))  # as large as the image
        np.testing.assert_allclose(_invert(px), _per_tile(res[..., o]), atol=0.02)


def test_response_grid_marks_pixels_no_output_covers_and_nonfinite_values():
    res = np.random.default_rng(2).normal(size=(4, 4, 2))  # 'valid' 3x3 on a 6x6 image
    res[1, 2, 1] = np.nan
    g = response_grid(np.zeros((6, 6, 1)), res, geometry=Geometry((3, 3)))
    px = _tile_pixels(g, 1, (6, 6))
    assert all(tuple(p) == UNCOVERED_RGB for p in (px[0, 0], px[5, 3], px[2, 0], px[0, 5]))
    np.testing.assert_allclose(_invert(px[1:-1, 1:-1]), _per_tile(res[..., 0]), atol=0.02)
    assert tuple(_tile_pixels(g, 2, (6, 6))[2, 3]) == NONFINITE_RGB
    assert np.isfinite(g.scales[1]) and np.isfinite(g.means[1])


def _scipy_same(image, kernel):
    """Zero-padded 'same' correlation of (H, W, C) with (k, k, C), summed over channels."""
    return sum(correlate2d(image[..., c], kernel[..., c], mode="same")
               for c in range(image.shape[-1]))


def _edge_columns(drawn, ref_columns):
    """Column-mean colour strength of a drawn tile: where it lights up, and where the
    reference's does."""
    strength = np.abs(drawn).mean(axis=0)
    return set(np.flatnonzero(strength > 0.5)), set(np.flatnonzero(ref_columns > 0.5))


VERTICAL_EDGE = np.array([[-1.0, 0.0, 1.0]] * 3)  # Prewitt: responds to vertical edges


def test_a_vertical_edge_kernel_lights_up_exactly_the_edges_of_a_digit_sized_image():
    img = np.zeros((8, 8, 1))
    img[:, 2:6] = 1.0  # a vertical bar: edges between columns 1|2 and 5|6
    kernel = np.stack([VERTICAL_EDGE, VERTICAL_EDGE.T], axis=-1)[:, :, None, :]  # (3,3,1,2)
    res = correlate(img[None], kernel, padding="same")[0]
    ref = _scipy_same(img, kernel[..., 0])
    g = response_grid(img, res, geometry=Geometry((3, 3), padding="same"))
    drawn = _invert(_tile_pixels(g, 1, (8, 8)))
    np.testing.assert_allclose(drawn, _per_tile(ref), atol=0.02)
    lit, want = _edge_columns(drawn, np.abs(_per_tile(ref)).mean(axis=0))
    assert lit == want == {1, 2, 5, 6}
    assert np.abs(drawn[:, [0, 3, 4, 7]]).max() <= 0.02  # flat columns stay white


def _photo(size):
    """A bundled photograph, box-downsampled to `size` (H, W), as floats in [0, 1]."""
    from sklearn.datasets import load_sample_images

    china = load_sample_images().images[0].astype(np.float64) / 255.0  # (427, 640, 3)
    fh, fw = china.shape[0] // size[0], china.shape[1] // size[1]
    crop = china[: size[0] * fh, : size[1] * fw]
    return crop.reshape(size[0], fh, size[1], fw, 3).mean(axis=(1, 3))


def test_on_a_photo_the_edge_tile_shows_the_edges_a_bright_tile_would_wash_out():
    img = _photo((60, 80))
    kernel = np.stack([np.repeat(VERTICAL_EDGE[..., None], 3, -1) / 3,  # edges
                       np.ones((3, 3, 3))], axis=-1)  # brightness: a large positive mean
    res = correlate(img[None], kernel, padding="same")[0]
    ref = _scipy_same(img, kernel[..., 0])
    g = response_grid(img, res, geometry=Geometry((3, 3), padding="same"))
    drawn = _invert(_tile_pixels(g, 1, (60, 80)))
    np.testing.assert_allclose(drawn, _per_tile(ref), atol=0.02)
    # the strongest tenth of the reference's edge pixels are drawn far stronger than the rest
    edges = np.abs(_per_tile(ref)) >= np.quantile(np.abs(_per_tile(ref)), 0.9)
    assert np.abs(drawn[edges]).mean() > 4 * np.abs(drawn[~edges]).mean()
    # one scale shared with the brightness map would have drawn the edges near white
    assert np.abs(ref).max() < 0.2 * np.abs(res[..., 1]).max()


def test_a_strided_7x7_first_layer_is_drawn_at_the_input_size_over_its_edges():
    rng = np.random.default_rng(3)
    img = 0.1 * rng.random((64, 64, 3))
    img[:, 20:40] += 0.8  # a bright vertical bar: edges at columns 19|20 and 39|40
    edge = np.zeros((7, 7))
    edge[:, :3], edge[:, 4:] = -1.0, 1.0
    kernel = rng.normal(size=(7, 7, 3, 4)) * 0.1
    kernel[..., 0] = np.repeat(edge[..., None], 3, -1)
    res = correlate(img[None], kernel, strides=2, padding="same")[0]
    assert res.shape == (32, 32, 4)
    full = _scipy_same(img, kernel[..., 0])  # stride 1; output o of stride 2 is centred on 2o+1
    np.testing.assert_allclose(res[..., 0], full[1::2, 1::2], atol=1e-9)
    g = response_grid(img, res, geometry=Geometry((7, 7), (2, 2), "same"))
    assert g.scale == 1 and g.origins[2][1] - g.origins[1][1] == 64 + 1  # cells: 64 px + line
    drawn = _invert(_tile_pixels(g, 1, (64, 64)))  # the tile is the input's 64 x 64 pixels
    upsampled = np.repeat(np.repeat(_per_tile(full[1::2, 1::2]), 2, axis=0), 2, axis=1)
    np.testing.assert_allclose(drawn, upsampled, atol=0.02)
    lit, want = _edge_columns(drawn, np.abs(_per_tile(full)).mean(axis=0))
    assert lit == want  # lit exactly where the stride-1 reference is
    assert all(min(abs(c - 19.5), abs(c - 39.5)) < 3 for c in lit)  # at the planted edges
    assert lit & set(range(17, 23)) and lit & set(range(37, 43))  # both edges light up


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


@pytest.mark.parametrize("level", [None, 0, 1, 6])
def test_png_of_a_kernel_grid_roundtrips_at_every_level(level):
    """The default (ISA-L where installed) and each zlib level decode to the same pixels."""
    kernel = np.random.default_rng(1).normal(size=(3, 3, 3, 40)).astype(np.float32)
    img = kernel_grid(kernel).image
    np.testing.assert_array_equal(_decode_png(encode_png(img, level)), img)


def test_png_without_isal_is_zlib_at_png_level(monkeypatch):
    import sys

    from keras_weightwatch import images

    img = kernel_grid(np.random.default_rng(2).normal(size=(5, 5, 1, 12))).image
    monkeypatch.setitem(sys.modules, "isal", None)  # as where it is not installed
    images._fast_deflate.cache_clear()
    try:
        png = encode_png(img)
    finally:
        images._fast_deflate.cache_clear()
    assert png == encode_png(img, images.PNG_LEVEL)
    np.testing.assert_array_equal(_decode_png(png), img)


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


def test_diverging_colours_are_exactly_the_interpolated_colour_map():
    # The map is drawn from a table of its steps: it must agree with plain interpolation
    # everywhere, at and next to every step and control point included.
    from keras_weightwatch.images import _CMAP_RGB, _CMAP_X, _colour_steps

    def reference(t):
        rgb = [np.interp(np.clip(t, -1, 1), _CMAP_X, _CMAP_RGB[:, c]) for c in range(3)]
        return np.rint(np.stack(rgb, axis=-1)).astype(np.uint8)

    points = _colour_steps()[0]
    rng = np.random.default_rng(5)
    t = np.concatenate([
        np.linspace(-1.2, 1.2, 200001), rng.uniform(-1, 1, 100000), points,
        np.nextafter(points, 2), np.nextafter(points, -2), _CMAP_X,
        np.nextafter(_CMAP_X, 2), np.nextafter(_CMAP_X, -2), [-0.0, 5e-324, -5e-324],
    ])
    np.testing.assert_array_equal(diverging_rgb(t, 1.0), reference(t))
    strided = t[: len(t) // 7 * 7].reshape(-1, 7)[:, ::2]
    np.testing.assert_array_equal(diverging_rgb(strided, 1.0), reference(strided))
    assert diverging_rgb(np.array(0.25), 1.0).tolist() == reference(np.array(0.25)).tolist()
