"""`drift`: per-layer change through a run, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from compare_runs import epochs, write_run

from keras_weightwatch import WeightWatchError, drift


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", epochs())


def test_drift_per_layer_matches_numpy(run_dir):
    snaps = epochs()
    d = drift(run_dir)
    assert d.steps == ("initial", "0", "1")
    names = [layer.name for layer in d.layers]
    assert names == ["conv1", "bn", "conv2", "dense", "out"]
    for layer in d.layers:
        keys = [k for k in snaps[0][2] if k.startswith(layer.name + "/")]

        def rel(x, y, keys=keys):
            num = sum(np.sum((np.float64(y[k]) - x[k]) ** 2) for k in keys)
            den = sum(np.sum(np.float64(x[k]) ** 2) for k in keys)
            return np.sqrt(num / den)

        expect_step = [rel(snaps[i][2], snaps[i + 1][2]) for i in range(2)]
        expect_total = [rel(snaps[0][2], snaps[i + 1][2]) for i in range(2)]
        assert layer.step_change == pytest.approx(expect_step, rel=1e-10)
        assert layer.from_initial == pytest.approx(expect_total, rel=1e-10)


def test_drift_needs_two_snapshots(tmp_path):
    one = write_run(tmp_path / "one", epochs(1))
    with pytest.raises(WeightWatchError, match="at least two snapshots"):
        drift(one)
