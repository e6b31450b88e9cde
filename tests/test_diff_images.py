"""`weightwatch diff --images`: A, B and B - A kernel grids read back with TensorBoard."""

from __future__ import annotations

import os

import numpy as np
import pytest
from compare_runs import cli, epochs, write_run


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", epochs())


def test_cli_images_writes_a_b_and_difference_grids_for_each_conv_layer(run_dir, tmp_path):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    from keras_weightwatch.images import kernel_grid

    tb = tmp_path / "tb"
    code, out, err = cli("diff", f"{run_dir}@initial", run_dir, "--images", tb)
    assert code == 0 and err == ""
    acc = pea.EventAccumulator(str(tb), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert tags == {f"{k}/{s}" for k in ("conv1/kernel", "conv2/kernel")
                    for s in ("A", "B", "B_minus_A")}
    snaps = epochs()
    import zlib

    for t in sorted(tags):
        (event,) = acc.Tensors(t)
        w, h, png = tensor_util.make_ndarray(event.tensor_proto)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        key, which = t.rsplit("/", 1)
        a, b = snaps[0][2][key].astype(np.float64), snaps[2][2][key].astype(np.float64)
        grid = kernel_grid({"A": a, "B": b, "B_minus_A": b - a}[which])
        assert (int(w), int(h)) == (grid.image.shape[1], grid.image.shape[0])
        # Decode the PNG's pixels (filter 0 rows) and compare with the grid.
        idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
        raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(int(h), -1)
        assert np.array_equal(raw[:, 1:].reshape(grid.image.shape), grid.image)
    code, out, err = cli("diff", run_dir, run_dir, "--images", tb)
    assert code == 2 and "already holds TensorBoard event files" in err
    assert os.path.isdir(tb)


def _read_images(tb):
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(str(tb), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    out = {}
    for t in acc.Tags()["tensors"]:
        (event,) = acc.Tensors(t)
        w, h, png = tensor_util.make_ndarray(event.tensor_proto)
        meta = acc.SummaryMetadata(t)
        out[t] = (int(w), int(h), png, meta.summary_description)
    return out


def test_b_is_drawn_in_the_order_of_the_matching_and_the_description_says_so(tmp_path):
    from compare_runs import perm_of, permuted, weights

    from keras_weightwatch.images import encode_png, kernel_grid

    w = weights(np.random.default_rng(4))
    q = permuted(w)
    a, b = write_run(tmp_path / "a", [("epoch", 0, w)]), write_run(tmp_path / "b",
                                                                   [("epoch", 0, q)])
    tb = tmp_path / "tb"
    code, out, err = cli("diff", a, b, "--images", tb)
    assert code == 0 and err == "" and f"tensorboard --logdir {tb}" in out
    images = _read_images(tb)
    p1 = perm_of(w["conv1/kernel"], q["conv1/kernel"])
    for key in ("conv1/kernel", "conv2/kernel"):
        # B is the same network, reordered: drawn in A's order it is A's picture exactly.
        assert images[f"{key}/B"][2] == images[f"{key}/A"][2] == encode_png(
            kernel_grid(w[key].astype(np.float64)).image), key
        assert "reordered by the matching" in images[f"{key}/B"][3], key
    # Independent of the package's matching: conv1's tiles of B as stored, reordered by the
    # brute-force permutation, are A's.
    assert np.array_equal(q["conv1/kernel"][..., p1], w["conv1/kernel"])
    assert "inputs in the order matched" in images["conv2/kernel/B"][3]
    moved = int(np.sum(p1 != np.arange(4)))
    assert f"({moved} of 4 units moved)" in images["conv1/kernel/B"][3]
    # Without matching, B is drawn as stored and the description says so.
    tb2 = tmp_path / "tb2"
    code, out, err = cli("diff", a, b, "--images", tb2, "--no-match")
    images = _read_images(tb2)
    assert images["conv1/kernel/B"][2] == encode_png(
        kernel_grid(q["conv1/kernel"].astype(np.float64)).image)
    assert "as stored" in images["conv1/kernel/B"][3]


def test_images_of_a_model_without_convolutions_say_so_and_write_nothing(tmp_path):
    rng = np.random.default_rng(0)
    layers = [("d", "Dense"), ("o", "Dense")]
    snaps = [("epoch", s, {"d/kernel": rng.normal(size=(4, 3)).astype("float32"),
                           "o/kernel": rng.normal(size=(3, 1)).astype("float32")})
             for s in (0, 1)]
    run = write_run(tmp_path / "run", snaps, layers=layers)
    tb = tmp_path / "tb"
    code, out, err = cli("diff", f"{run}@0", f"{run}@1", "--images", tb)
    assert code == 0 and err == ""
    assert "nothing to draw" in out and "tensorboard --logdir" not in out
    assert not os.path.exists(tb)
    from keras_weightwatch.diff_images import write_diff_images

    assert write_diff_images(f"{run}@0", f"{run}@1", tb) == [] and not os.path.exists(tb)
