"""The text reports (`report`): the diff and drift tables, against the results they render."""

from __future__ import annotations

import json

import numpy as np
import pytest
from compare_runs import cli, epochs, weights, write_run

from keras_weightwatch import diff_runs, drift
from keras_weightwatch.report import render_drift


@pytest.fixture
def run_dir(tmp_path):
    return write_run(tmp_path / "run", epochs())


def test_cli_diff_prints_layers_most_changed_first_in_80_columns(tmp_path):
    w = weights(np.random.default_rng(8))
    v = dict(w, **{"conv2/kernel": w["conv2/kernel"] * 2, "dense/bias": w["dense/bias"] + 1})
    a = write_run(tmp_path / "a", [("epoch", 0, w)])
    b = write_run(tmp_path / "b", [("epoch", 0, v)])
    code, out, err = cli("diff", a, b)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"A  {a}@0" and lines[1] == f"B  {b}@0"
    assert all(len(line) <= 80 for line in lines[2:])
    assert "12 tensors: 2 changed, 10 unchanged" in out
    result = diff_runs(a, b)
    order = [lay.name for lay in result.layers if not lay.unchanged]
    sq = {k: np.sum(np.float64(x) ** 2) for k, x in w.items()}
    layer_rel = {
        "conv2": np.sqrt(sq["conv2/kernel"] / (sq["conv2/kernel"] + sq["conv2/bias"])),
        "dense": np.sqrt(np.sum((np.float64(v["dense/bias"]) - w["dense/bias"]) ** 2)
                         / (sq["dense/kernel"] + sq["dense/bias"])),
    }
    assert order == sorted(layer_rel, key=lambda n: -layer_rel[n])
    for name in order:
        assert result.layers[order.index(name)].rel_l2 == pytest.approx(layer_rel[name], rel=1e-12)
    row = next(line for line in lines if line.startswith("  conv2/kernel"))
    assert row.split()[1:3] == [f"{1.0:.4g}", f"{1.0:.4f}"]
    layer_rows = [i for i, x in enumerate(lines) if x.split()[:1] in (["conv2"], ["dense"])]
    assert [lines[i].split()[0] for i in layer_rows] == order
    assert any(line.split() == ["conv1", "identical"] for line in lines)


def test_cli_drift_table_and_json(run_dir):
    code, out, err = cli("drift", run_dir)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"run        {run_dir}" and lines[1] == "snapshots  3: initial, 0, 1"
    assert all(len(line) <= 80 for line in lines[1:])
    d = drift(run_dir)
    for layer in d.layers:
        row = next(line for line in lines if line.split()[:1] == [layer.name]).split()
        assert len(row[1]) == 2 and set(row[1]) <= set("▁▂▃▄▅▆▇█")
        assert float(row[2]) == pytest.approx(layer.step_change[-1], rel=1e-3)
        assert float(row[3]) == pytest.approx(max(layer.step_change), rel=1e-3)
        assert float(row[4]) == pytest.approx(layer.from_initial[-1], rel=1e-3)
    code, out, err = cli("drift", run_dir, "--json", "--layer", "conv")
    doc = json.loads(out)
    assert [x["name"] for x in doc["layers"]] == ["conv1", "conv2"]
    assert doc["layers"][0]["step_change"] == pytest.approx(list(d.layers[0].step_change))
    assert render_drift(d).splitlines()[0] == lines[0]
