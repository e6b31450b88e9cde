"""views.spectral: weightwatcher's metrics during fit, read back with TensorBoard's reader and
compared to weightwatcher's analyze() of the same weights; stored stats, drift, show, CLI."""

from __future__ import annotations

import io
import json
import logging
import math
import warnings

import keras
import numpy as np
import pytest
from view_helpers import _acc, _tags_by_plugin, _values

from keras_weightwatch import WeightWatch, WeightWatchWarning, drift, load_run
from keras_weightwatch.cli import main
from keras_weightwatch.report import render_drift, render_show
from keras_weightwatch.spectral import spectral


def _model():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((64,)), keras.layers.Dense(96, name="h1"),
                             keras.layers.Dense(64, name="h2"), keras.layers.Dense(10, name="out")])


def _analyze(weights):
    ww = pytest.importorskip("weightwatcher")
    model = _model()
    model.set_weights(weights)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=model).analyze()
    return {row["name"]: row for _, row in details.iterrows()}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from conftest import WeightsRecorder

    run = str(tmp_path_factory.mktemp("spectral") / "run")
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 64)).astype("float32")
    y = rng.standard_normal((64, 10)).astype("float32")
    recorder = WeightsRecorder()
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[
        WeightWatch(run, histograms=False, kernel_images=False, spectral_freq=2), recorder])
    return run, recorder


def test_scalars_agree_with_weightwatcher_analyze_of_the_same_weights(fitted):
    run, recorder = fitted
    acc = _acc(run)
    tags = _tags_by_plugin(acc)
    # snapshots -1, 0, 1, 2: measured at the 1st and 3rd (steps -1 and 1)
    assert _values(acc, "h1/kernel/alpha").keys() == {-1, 1}
    assert {"h1/kernel/esd", "h2/kernel/esd", "out/kernel/esd"} <= tags["histograms"]
    assert "out/kernel/alpha" not in tags["scalars"]  # 10 eigenvalues: no fit
    details = _analyze(recorder.epochs[1])
    fitted_layers = 0
    for layer in ("h1", "h2", "out"):
        row = details[layer]
        for metric in ("spectral_norm", "stable_rank", "log_norm"):
            got = float(_values(acc, f"{layer}/kernel/{metric}")[1])
            assert got == pytest.approx(row[metric], rel=1e-5), (layer, metric)
        if layer != "out":
            fitted_layers += 1
            for metric in ("alpha", "alpha_weighted"):
                got = float(_values(acc, f"{layer}/kernel/{metric}")[1])
                assert got == pytest.approx(row[metric], rel=0.02), (layer, metric)
    assert fitted_layers == 2


def test_esd_histogram_counts_the_eigenvalues_of_the_gram_matrix(fitted):
    run, recorder = fitted
    hist = _values(_acc(run), "h2/kernel/esd")[1]
    k = recorder.epochs[1][2].astype(np.float64)  # h2/kernel (96, 64)
    evals = np.linalg.eigvalsh(k.T @ k)
    assert hist[:, 2].sum() == np.count_nonzero(evals > 1e-5) == 64
    assert hist[0, 0] == pytest.approx(np.log10(evals.min()), rel=1e-9)
    assert hist[-1, 1] == pytest.approx(np.log10(evals.max()), rel=1e-9)


def test_summary_names_kernels_without_alpha_and_why(fitted):
    run, _ = fitted
    text = _values(_acc(run), "spectral/summary")[1].item().decode()
    assert "2 of 3 kernels have an alpha" in text
    assert "`out/kernel`" in text and "alpha needs 50 eigenvalues" in text


def test_stored_stats_equal_spectral_of_the_snapshot_on_disk(fitted):
    run, _ = fitted
    r = load_run(run)
    for snap in r.snapshots:
        has = "alpha" in snap.stats["h1/kernel"]
        assert has == (snap.step in (-1, 1))
        if has:
            result = spectral(r, snap.step)
            for key, m in result.tensors.items():
                stored = snap.stats[key]
                for name, v in m.to_stats().items():
                    assert (math.isnan(v) and math.isnan(stored[name])) or stored[name] == v
    assert "alpha" not in r.snapshot(-1).stats["h1/bias"]


def test_drift_and_show_read_the_stored_alpha(fitted):
    run, _ = fitted
    d = drift(run)
    h1 = next(layer for layer in d.layers if layer.name == "h1")
    stored = [load_run(run).snapshot(s).stats["h1/kernel"].get("alpha", math.nan)
              for s in (-1, 0, 1, 2)]
    np.testing.assert_array_equal(h1.alpha, stored)
    assert next(layer for layer in d.layers if layer.name == "out").alpha is not None
    assert d.to_json()["layers"][0]["alpha"][1] == "NaN"
    assert "alpha (power law of the ESD tail" in render_drift(d)
    assert "spectral  at 1 (stored at initial, 1" in render_show(load_run(run))


def test_diff_reads_the_stored_spectral_metrics_of_both_snapshots(fitted):
    from keras_weightwatch import diff_runs

    run, _ = fitted
    r = load_run(run)
    result = diff_runs(f"{run}@initial", f"{run}@1")
    for key in ("h1/kernel", "h2/kernel", "out/kernel"):
        t = result.tensor(key)
        for got, step in ((t.spectral_a, -1), (t.spectral_b, 1)):
            stored = r.snapshot(step).stats[key]
            for name in ("alpha", "stable_rank", "spectral_norm", "log_norm"):
                v = getattr(got, name)
                assert v == stored[name] or (math.isnan(v) and math.isnan(stored[name]))
    assert math.isfinite(result.tensor("h1/kernel").spectral_b.alpha)
    assert result.tensor("h1/bias").spectral_a is None
    assert diff_runs(f"{run}@0", f"{run}@1").tensor("h1/kernel").spectral_a is None


def test_cli_spectral_json_equals_the_records(fitted):
    run, _ = fitted
    out = io.StringIO()
    assert main(["spectral", f"{run}@0", "--json"], stdout=out) == 0
    assert json.loads(out.getvalue()) == spectral(run, 0).to_json()
    out = io.StringIO()
    assert main(["spectral", run], stdout=out) == 0
    m = spectral(run).tensors["h1/kernel"]
    row = next(line for line in out.getvalue().splitlines() if line.startswith("h1/kernel"))
    cells = row.split()
    assert cells[1] == "64x96" and float(cells[2]) == pytest.approx(m.alpha, rel=1e-4)
    assert float(cells[4]) == pytest.approx(m.stable_rank, rel=1e-4)
    assert "alpha needs 50 eigenvalues" in out.getvalue()


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, r"`spectral_freq` must be an integer >= 1\. Received: spectral_freq=0"),
    ("2", TypeError, r"Received: spectral_freq='2'"),
])
def test_bad_spectral_freq_raises_in_init(tmp_path, value, error, match):
    with pytest.raises(error, match=match):
        WeightWatch(tmp_path / "run", spectral_freq=value)


def test_spectral_traps_are_stored_written_and_printed(tmp_path):
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    weights = model.get_weights()
    weights[0][3, 5] = 40.0  # one outsized entry of h1's kernel: a trap
    model.set_weights(weights)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64)).astype("float32")
    run = str(tmp_path / "run")
    with pytest.warns(WeightWatchWarning, match="correlation_traps in layer 'h1' at step -1"):
        model.fit(x, np.zeros((16, 10), "float32"), epochs=1, verbose=0, callbacks=[
            WeightWatch(run, histograms=False, kernel_images=False, spectral_freq=1,
                        spectral_traps=True)])
    r = load_run(run)
    stats = r.snapshots[-1].stats
    assert stats["h1/kernel"]["num_traps"] >= 1 and stats["h2/kernel"]["num_traps"] == 0
    again = spectral(r, traps=True).tensors
    assert {k: float(m.num_traps) for k, m in again.items()} == {
        k: stats[k]["num_traps"] for k in again}
    acc = _acc(run)
    assert float(_values(acc, "h1/kernel/num_traps")[0]) == stats["h1/kernel"]["num_traps"]
    assert "**Correlation traps**" in _values(acc, "spectral/summary")[0].item().decode()
    out = io.StringIO()
    assert main(["spectral", run, "--traps", "--json"], stdout=out) == 0
    doc = json.loads(out.getvalue())["tensors"]
    assert doc["h1/kernel"]["num_traps"] == stats["h1/kernel"]["num_traps"]
    out = io.StringIO()
    assert main(["spectral", run, "--traps"], stdout=out) == 0
    header = next(line for line in out.getvalue().splitlines() if line.startswith("weight "))
    assert "traps" in header.split()
    # Without --traps: not computed, no column.
    out = io.StringIO()
    assert main(["spectral", run, "--json"], stdout=out) == 0
    assert json.loads(out.getvalue())["tensors"]["h1/kernel"]["num_traps"] is None


def test_spectral_traps_need_spectral_freq(tmp_path):
    with pytest.raises(ValueError, match="spectral_traps"):
        WeightWatch(tmp_path / "run", spectral_traps=True)
