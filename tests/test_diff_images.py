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
