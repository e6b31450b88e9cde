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


# --------------------------------------------------------------------------- the pieces


def test_nan_and_inf_have_one_spelling_in_every_report():
    from keras_weightwatch import features, textfmt
    from keras_weightwatch.compare.records import json_num
    from keras_weightwatch.report import fmt_cos, fmt_g, fmt_num

    nan, inf = float("nan"), float("inf")
    assert fmt_g(nan) == fmt_num(nan) == fmt_cos(nan) == json_num(nan) == textfmt.NAN_TEXT
    assert fmt_g(inf) == fmt_num(inf) == json_num(inf) == textfmt.INF_TEXT
    assert fmt_g(-inf) == fmt_num(-inf) == json_num(-inf) == textfmt.NEG_INF_TEXT
    # the spelling the reports use in words too ("3 NaN, 1 Inf")
    assert (textfmt.NAN_TEXT, textfmt.INF_TEXT, textfmt.NEG_INF_TEXT) == ("NaN", "Inf", "-Inf")
    rows = features.top_k_features(np.array([[np.nan], [1.0]]), ["a", "b"], 2)
    table = features.markdown_table(rows)  # the TensorBoard text of the top-k view
    assert "| nan |" not in table and f"| {textfmt.NAN_TEXT} |" in table


def test_drift_table_spells_a_nan_change_as_nan():
    from keras_weightwatch.compare import DriftResult, LayerDrift
    from keras_weightwatch.textfmt import NAN_TEXT

    d = DriftResult("r", ("initial", "0", "1"),
                    (LayerDrift("dense", (0.5, float("nan")), (0.5, float("nan"))),))
    row = next(line for line in render_drift(d).splitlines() if line.startswith("dense"))
    cells = row.split()
    assert cells[1] == "█!"  # the sparkline: NaN drawn as `!`
    assert cells[2] == NAN_TEXT and cells[3] == "0.5" and cells[4] == NAN_TEXT


@pytest.mark.parametrize("values", [[0.0, 0.5, 1.0], [3.0, 1.0], [0.0, 0.0], list(range(50))])
def test_sparkline_scales_to_the_largest_value(values):
    from keras_weightwatch.report import sparkline

    bars = "▁▂▃▄▅▆▇█"
    width = 24
    got = sparkline(values, width)
    if len(values) > width:  # binned: the largest of each bin
        n = len(values)
        values = [max(values[i * n // width:(i + 1) * n // width]) for i in range(width)]
    top = max(values)
    expect = "".join(bars[0] if top <= 0 else bars[int(round(v / top * 7))] for v in values)
    assert got == expect


def test_table_aligns_columns_under_a_ruled_header():
    from keras_weightwatch.report import table

    text = table([["a", "1"], ["long", "22"]], ["name", "n"], right=[1])
    assert text.splitlines() == ["name   n", "----  --", "a      1", "long  22"]


def test_numbers_in_show_and_shapes():
    from keras_weightwatch.report import fmt_int, fmt_num, shape_text

    assert fmt_int(1234567) == "1,234,567"
    assert [fmt_num(x) for x in (0.0, 2.0, 0.12345, 1e-5, 2e6)] == [
        "0", "2", "0.1235", f"{1e-5:.3e}", f"{2e6:.3e}"]
    # Shapes are printed as the Python tuples they are: the reference is `str(tuple)`.
    for shape in [(3, 3, 1, 5), (8,), (), (4, 8)]:
        assert shape_text(shape) == str(shape)
    assert shape_text([8]) == "(8,)" and shape_text(None) == "-"


@pytest.mark.parametrize("first", ["initial", "0", "-1"])
def test_drift_header_keeps_its_words_apart(first):
    from keras_weightwatch.compare import DriftResult, LayerDrift

    d = DriftResult("r", (first, "1", "2"), (LayerDrift("dense", (0.5, 0.2), (0.5, 0.6)),))
    line = next(x for x in render_drift(d).splitlines() if x.startswith(f"from {first}"))
    import re

    assert re.match(rf"from {re.escape(first)} +\|\|W_t - W_{re.escape(first)}\|\| / ", line)
    per_step = next(x for x in render_drift(d).splitlines() if x.startswith("per step"))
    # the two explanations start in one column when the step's name is short
    if len(first) <= 5:
        assert line.index("||") == per_step.index("||")


def test_the_diff_summary_words_name_the_comparisons_statuses():
    from keras_weightwatch.compare import records
    from keras_weightwatch.report import _STATUS_WORDS

    assert [s for s, _ in _STATUS_WORDS] == [
        records.STATUS_ONLY_A, records.STATUS_ONLY_B, records.STATUS_SHAPE]


def test_show_names_each_effective_kernel_with_its_rule(tmp_path):
    from keras_weightwatch import load_run
    from keras_weightwatch.report import render_show
    from keras_weightwatch.run import Derivation

    rng = np.random.default_rng(0)
    arrays = {"q/kernel": rng.integers(-127, 128, (4, 3)).astype(np.int8),
              "q/kernel_scale": rng.random(3, dtype=np.float32) + 1,
              "l/kernel": rng.random((3, 2), dtype=np.float32),
              "l/lora_kernel_a": rng.random((3, 1), dtype=np.float32),
              "l/lora_kernel_b": rng.random((1, 2), dtype=np.float32)}
    derived = (Derivation("q/kernel", "int8", {"codes": "q/kernel", "scale": "q/kernel_scale"},
                          {}, "q"),
               Derivation("l/kernel", "lora", {"base": "l/kernel", "a": "l/lora_kernel_a",
                                               "b": "l/lora_kernel_b"}, {"scale": 2.0}, "l"))
    run = write_run(tmp_path / "r", [("epoch", 0, arrays)], derived=derived)
    lines = render_show(load_run(run)).splitlines()
    assert "effective int8 (codes / scale): q/kernel" in lines
    assert "effective lora (base + (alpha/rank) A@B): l/kernel" in lines
    plain = write_run(tmp_path / "p", [("epoch", 0, {"q/kernel_scale": arrays["q/kernel_scale"]})])
    assert not any(x.startswith("effective") for x in render_show(load_run(plain)).splitlines())
